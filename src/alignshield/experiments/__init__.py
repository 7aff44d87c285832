"""Experiments at scale: sweeps over configs, a results database, and reports.

- ``sweep``: a grid file (a base config + ``grid:`` / ``zip:`` axes over dotted config fields) expands
  into runs; each run is ``stages.run(cfg)``, so stages are shared through their hash-keyed folders
  and finished work is never recomputed.
- ``store``: ``<output_dir>/results.sqlite``, one row per (run, metric) with the resolved config,
  swept fields, library versions, git revision, seed, wall time and peak memory.
- ``report``: markdown tables, matplotlib plots and one static HTML page from that database.
"""
