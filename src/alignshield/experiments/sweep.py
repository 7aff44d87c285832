"""Running a sweep: every run of a grid (``grid.py``) is ``stages.run(cfg)``, recorded in the results
database (``store.py``) with its run metadata (``metadata.py``).

Stages are shared through their hash-keyed folders: the alignment reused by every fine-tune that
starts from it, a fine-tune by every repair of it. Finished work is never recomputed: a stage folder
exists only when complete, an interrupted training stage resumes from its checkpoint, and a run
already in the results database with its evaluation folder on disk is skipped. The grid language's
entry points (``load_sweep``, ``expand``, ``restrict``, ...) are importable from here too.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from alignshield import dist
from alignshield.experiments.grid import (GRIDS_DIR, TOP_KEYS, Axis, Run, Sweep, expand, find_grid, flatten,
                                          get_dotted, known_grids, load_sweep, matches, parse_filters, restrict,
                                          selector)
from alignshield.experiments.metadata import environment, git_revision, peak_memory, reset_peak_memory
from alignshield.experiments.store import ResultStore, RunRecord

log = logging.getLogger(__name__)

__all__ = [  # this module's own, and the grid language and run metadata it re-exports for callers
    "Executed", "Outcome", "execute", "run_sweep", "status", "validate",
    "GRIDS_DIR", "TOP_KEYS", "Axis", "Run", "Sweep", "expand", "find_grid", "flatten", "get_dotted", "known_grids",
    "load_sweep", "matches", "parse_filters", "restrict", "selector", "environment", "git_revision",
]


# --------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    computed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def status(sweep: Sweep) -> list[dict[str, Any]]:
    """Per run: which stage folders are done, partial (a scratch folder exists), to do, or ``-`` (none)."""
    from alignshield.repair import REPAIR_METHODS

    out = []
    store = _open_readonly(sweep.output_dir)
    for run in sweep.runs:
        stages_state = {}
        for stage, d in run.dirs.items():
            if stage == "repair" and not REPAIR_METHODS.get(run.config.repair.method).edits:
                stages_state[stage] = "-"  # nothing to repair: no folder
            elif d.exists():
                stages_state[stage] = "done"
            elif d.with_name(d.name + ".partial").exists():
                stages_state[stage] = "partial"
            else:
                stages_state[stage] = "todo"
        recorded = store is not None and store.has_run(run.key)
        out.append({"position": run.position, "key": run.key, "swept": run.swept, "stages": stages_state,
                    "recorded": recorded})
    if store is not None:
        store.close()
    return out


def validate(sweep: Sweep) -> None:
    """Fail before any compute: every run's pools, tasks, judges and pool disjointness."""
    from alignshield import stages

    for run in sweep.runs:
        stages.validate(run.config)


def run_sweep(sweep: Sweep, *, keep_going: bool = False, echo: Callable[[str], None] | None = None) -> Outcome:
    """Run every run of the sweep not already finished and recorded; record each in the database.

    Under ``torchrun`` / ``accelerate launch`` every process runs this same loop (training is
    data-parallel); rank 0 decides what to skip and tells the others, and only rank 0 writes the
    database. Other sweeps may run into the same folder at the same time (see ``restrict``).
    """
    main = dist.is_main_process()
    echo = echo if (echo and main) else (lambda _msg: None)
    out_dir = sweep.output_dir
    outcome = Outcome()
    t_start = time.perf_counter()
    validate(sweep)
    with _store(out_dir, main) as store:
        env = environment() if main else {}
        if store:
            store.record_sweep(sweep.name, sweep.source, sweep.spec() | {"base": sweep.base})
        total = len(sweep.runs)
        for i, run in enumerate(sweep.runs, 1):
            label = ", ".join(f"{k}={_short(v)}" for k, v in run.swept.items()) or "base config"
            try:
                done = execute(run, store, sweep.name, env,
                               on_start=lambda: echo(f"[{i}/{total}] {label}: running ({run.key})"))
            except Exception as err:  # noqa: BLE001 -- keep_going records it and moves on
                if not keep_going:
                    raise
                log.exception("run %s failed", run.key)
                outcome.failed.append((run.key, f"{type(err).__name__}: {err}"))
                echo(f"[{i}/{total}] {label}: FAILED: {type(err).__name__}: {err}")
                continue
            if done.computed is None:
                outcome.cached.append(run.key)
                echo(f"[{i}/{total}] {label}: done {'already' if done.wall is None else 'by another sweep meanwhile'} "
                     f"({run.key})")
                continue
            outcome.computed.append(run.key)
            reused = ", ".join(done.computed) or "all stages reused"
            echo(f"[{i}/{total}] {label}: finished in {done.wall:.1f} s ({reused}) {_headline(done.metrics)}")
    outcome.seconds = round(time.perf_counter() - t_start, 2)
    return outcome


@dataclass
class Executed:
    metrics: dict[str, Any]
    computed: list[str] | None
    """Stages this call computed; None: the run was finished and recorded already (by this sweep
    before, or by another sweep while this one waited), so nothing was recorded now."""
    wall: float | None
    """Seconds this call spent running it; None when it was skipped without running."""


def execute(run: Run, store: ResultStore | None, sweep: str, env: dict[str, Any],
            on_start: Callable[[], None] = lambda: None) -> Executed:
    """One run of a sweep (or of an attack search): skipped when it is finished and recorded, else
    ``stages.run`` (sharing every finished stage) and recorded in ``store`` as a member of ``sweep``.
    Every process calls it under DDP; rank 0 alone (``store`` not None) decides and writes."""
    from alignshield import stages

    def metrics_on_disk() -> dict[str, Any]:
        return json.loads((run.dirs["evaluate"] / "metrics.json").read_text(encoding="utf-8"))

    if dist.broadcast(bool(store and store.has_run(run.key) and run.dirs["evaluate"].exists())):
        if store:
            store.add_membership(sweep, run.key, run.position, run.swept)
        return Executed(metrics_on_disk(), None, None)
    on_start()
    scope = reset_peak_memory()
    t0 = time.perf_counter()
    with stages.recording_builds() as built:
        metrics = stages.run(run.config)
    wall = time.perf_counter() - t0
    computed = [s for s, d in run.dirs.items() if d in built]
    if not computed and dist.broadcast(bool(store and store.has_run(run.key))):
        # a concurrent sweep finished and recorded this run while this one waited for it
        if store:
            store.add_membership(sweep, run.key, run.position, run.swept)
        return Executed(metrics, None, wall)
    if store:
        rss, gpu = peak_memory()
        record = RunRecord(
            run_key=run.key, config=run.config.model_dump(mode="json"), swept=run.swept,
            seed=run.config.seed, stage_dirs={s: str(d) for s, d in run.dirs.items()},
            computed=computed, versions=env["versions"], git_revision=env["git_revision"],
            wall_seconds=round(wall, 3), peak_rss_mb=rss, peak_rss_scope=scope, peak_gpu_mb=gpu,
            world_size=dist.world_size(), host=env["host"], dtype=run.config.model.dtype,
            verdicts=_verdicts(run.dirs["evaluate"], run.config.evaluate.harmful.start),
        )
        store.record_run(record, metrics, sweep=sweep, position=run.position)
    return Executed(metrics, computed, wall)


def _verdicts(evaluate_dir: Path, start: int) -> list[tuple[int, str, bool, float | None, str | None]]:
    """Per harmful prompt (its row in the evaluation pool's dataset) and judge: flagged, score, label."""
    path = evaluate_dir / "samples.jsonl"
    if not path.exists():
        return []
    harmful = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    harmful = [s for s in harmful if s.get("kind") == "harmful"]
    return [(start + i, judge, bool(v["flagged"]), v.get("score"), v.get("label"))
            for i, s in enumerate(harmful) for judge, v in s.get("verdicts", {}).items()]


def _headline(metrics: dict[str, Any]) -> str:
    keys = [k for k in metrics if k.startswith(("harmful_score/", "finetune_accuracy/"))]
    return " ".join(f"{k}={metrics[k]}" for k in keys)


def _short(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


@contextmanager
def _store(output_dir: Path, main: bool) -> Iterator[ResultStore | None]:
    if not main:
        yield None
        return
    store = ResultStore.in_dir(output_dir)
    try:
        yield store
    finally:
        store.close()


def _open_readonly(output_dir: Path) -> ResultStore | None:
    try:
        return ResultStore.in_dir(output_dir, readonly=True)
    except Exception:  # noqa: BLE001 -- no database yet
        return None
