"""The results database: ``<output_dir>/results.sqlite``.

Tables (schema version 2):

- ``runs``: one row per run, keyed by the run key (the name of its evaluation folder, which hashes
  everything that determines the result): resolved config JSON, the swept fields of the sweep that
  recorded it (each sweep's own are in ``sweep_runs``), seed, library versions, git revision, wall
  time, peak memory, host, world size, and the dtype the model ran in (``model.dtype=auto`` resolved:
  results differ between dtypes, so they are kept apart).
- ``metrics``: one row per (run, metric) with a numeric value.
- ``verdicts``: one row per (run, harmful prompt, judge): the prompt's index in the evaluation pool,
  whether the judge flagged the answer (after the coherence gate), its score and label; what paired
  comparisons between configurations are computed from.
- ``sweeps`` / ``sweep_runs``: which sweep (grid file) asked for which run, with that sweep's swept
  fields; a run shared by two sweeps is stored once and belongs to both.
- view ``results``: one row per (run, metric) joined with the run's columns (the flat table for
  ad-hoc SQL: ``sqlite3 runs/results.sqlite "select * from results"``).

Every write is one SQLite transaction (rollback journal, ``synchronous=FULL``): a process killed at
any moment, even with SIGKILL in the middle of a write, leaves the database as it was before that
write, and the run is simply recorded again by the rerun.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_key         TEXT PRIMARY KEY,
    config_json     TEXT NOT NULL,
    swept_json      TEXT NOT NULL,
    seed            INTEGER,
    stage_dirs_json TEXT,
    computed_json   TEXT,
    versions_json   TEXT,
    git_revision    TEXT,
    wall_seconds    REAL,
    peak_rss_mb     REAL,
    peak_rss_scope  TEXT,
    peak_gpu_mb     REAL,
    world_size      INTEGER,
    host            TEXT,
    finished_at     TEXT,
    dtype           TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_key TEXT NOT NULL REFERENCES runs(run_key),
    metric  TEXT NOT NULL,
    value   REAL,
    PRIMARY KEY (run_key, metric)
);
CREATE TABLE IF NOT EXISTS verdicts (
    run_key TEXT NOT NULL REFERENCES runs(run_key),
    prompt  INTEGER NOT NULL,
    judge   TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    score   REAL,
    label   TEXT,
    PRIMARY KEY (run_key, prompt, judge)
);
CREATE TABLE IF NOT EXISTS sweeps (
    name       TEXT PRIMARY KEY,
    source     TEXT,
    spec_json  TEXT NOT NULL,
    updated_at TEXT
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep      TEXT NOT NULL,
    run_key    TEXT NOT NULL,
    position   INTEGER,
    swept_json TEXT NOT NULL,
    PRIMARY KEY (sweep, run_key)
);
CREATE VIEW IF NOT EXISTS results AS
    SELECT m.run_key, m.metric, m.value, r.seed, r.swept_json, r.config_json, r.versions_json,
           r.git_revision, r.wall_seconds, r.peak_rss_mb, r.peak_rss_scope, r.peak_gpu_mb,
           r.world_size, r.host, r.finished_at,
           (SELECT group_concat(s.sweep, ',') FROM sweep_runs s WHERE s.run_key = m.run_key) AS sweeps
    FROM metrics m JOIN runs r ON r.run_key = m.run_key;
"""


class StoreError(RuntimeError):
    pass


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """What a sweep knows about one finished run, besides its metrics."""

    run_key: str
    config: dict[str, Any]
    swept: dict[str, Any]
    seed: int
    stage_dirs: dict[str, str] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    """Stages computed in the session that recorded the run (the others were reused from disk)."""
    versions: dict[str, str | None] = field(default_factory=dict)
    git_revision: str | None = None
    wall_seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_rss_scope: str | None = None
    peak_gpu_mb: float | None = None
    world_size: int = 1
    host: str | None = None
    finished_at: str = field(default_factory=now)
    dtype: str | None = None
    verdicts: list[tuple[int, str, bool, float | None, str | None]] = field(default_factory=list)
    """(prompt index, judge, flagged, score, label) per harmful prompt and judge."""


@dataclass
class StoredRun:
    """A run as read back: its config, swept fields (per the sweep asked for), metrics and metadata."""

    run_key: str
    config: dict[str, Any]
    swept: dict[str, Any]
    seed: int
    metrics: dict[str, float]
    meta: dict[str, Any]
    sweeps: list[str]


class ResultStore:
    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise StoreError(f"no results database at {self.path}; run `alignshield sweep GRID.yaml` first")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA synchronous=FULL")
            with self.transaction():
                _migrate(self.conn)
                for statement in _split(_SCHEMA):
                    self.conn.execute(statement)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version and int(version[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version[0]}, this alignshield reads {SCHEMA_VERSION}")

    @classmethod
    def in_dir(cls, output_dir: str | Path, *, readonly: bool = False) -> "ResultStore":
        return cls(Path(output_dir) / DB_NAME, readonly=readonly)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; BEGIN IMMEDIATE takes the write lock up front (waits up to 60 s for another writer)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------------------ writes

    def record_sweep(self, name: str, source: str | None, spec: dict[str, Any]) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO sweeps VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                      "source=excluded.source, spec_json=excluded.spec_json, updated_at=excluded.updated_at",
                      (name, source, _dumps(spec), now()))

    def record_run(self, record: RunRecord, metrics: dict[str, Any], *, sweep: str | None = None,
                   position: int | None = None) -> None:
        """The run, its metrics and its sweep membership, in one transaction (replacing an older record)."""
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_key=?", (record.run_key,))
            c.execute("DELETE FROM verdicts WHERE run_key=?", (record.run_key,))
            dtype = record.dtype or record.config.get("model", {}).get("dtype")
            c.execute(
                "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (record.run_key, _dumps(record.config), _dumps(record.swept), record.seed,
                 _dumps(record.stage_dirs), _dumps(record.computed), _dumps(record.versions),
                 record.git_revision, record.wall_seconds, record.peak_rss_mb, record.peak_rss_scope,
                 record.peak_gpu_mb, record.world_size, record.host, record.finished_at, dtype),
            )
            c.executemany("INSERT INTO metrics VALUES (?,?,?)",
                          [(record.run_key, k, v) for k, v in sorted(numeric.items())])
            c.executemany("INSERT INTO verdicts VALUES (?,?,?,?,?,?)",
                          [(record.run_key, i, j, int(f), sc, lab) for i, j, f, sc, lab in record.verdicts])
            if sweep is not None:
                self._member(c, sweep, record.run_key, position, record.swept)

    def add_membership(self, sweep: str, run_key: str, position: int | None, swept: dict[str, Any]) -> None:
        with self.transaction() as c:
            self._member(c, sweep, run_key, position, swept)

    @staticmethod
    def _member(c: sqlite3.Connection, sweep: str, run_key: str, position: int | None, swept: dict) -> None:
        c.execute("INSERT OR REPLACE INTO sweep_runs VALUES (?,?,?,?)", (sweep, run_key, position, _dumps(swept)))

    # ------------------------------------------------------------------------------ reads

    def verdicts(self, run_key: str, judge: str) -> dict[int, bool]:
        """Prompt index -> flagged, for one run and judge."""
        rows = self.conn.execute("SELECT prompt, flagged FROM verdicts WHERE run_key=? AND judge=?", (run_key, judge))
        return {p: bool(f) for p, f in rows}

    def has_run(self, run_key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM runs WHERE run_key=?", (run_key,)).fetchone() is not None

    def sweeps(self) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute("SELECT name, source, spec_json, updated_at FROM sweeps ORDER BY name")
        return {n: {"source": s, "spec": json.loads(j), "updated_at": u} for n, s, j, u in rows}

    def runs(self, sweep: str | None = None, superseded: bool = False) -> list[StoredRun]:
        """Every run (in recording order within a sweep), or those of one sweep with its swept fields.

        A run whose resolved config equals a later-finished run's was evaluated again under something
        its config does not hold (a retrained judge, a changed coherence gate: the evaluation's key
        holds their versions): only the latest is returned, unless ``superseded``."""
        metrics: dict[str, dict[str, float]] = {}
        for key, metric, value in self.conn.execute("SELECT run_key, metric, value FROM metrics"):
            metrics.setdefault(key, {})[metric] = value
        members: dict[str, list[str]] = {}
        for s, key in self.conn.execute("SELECT sweep, run_key FROM sweep_runs ORDER BY sweep"):
            members.setdefault(key, []).append(s)
        cols = [d[1] for d in self.conn.execute("PRAGMA table_info(runs)")]
        configs: dict[str, str] = {}
        if sweep is None:
            rows = self.conn.execute("SELECT *, NULL, NULL FROM runs ORDER BY finished_at, run_key").fetchall()
        else:
            if sweep not in self.sweeps():
                known = ", ".join(self.sweeps()) or "(none)"
                raise StoreError(f"no sweep {sweep!r} in {self.path}. Known: {known}")
            rows = self.conn.execute(
                "SELECT r.*, s.swept_json, s.position FROM runs r JOIN sweep_runs s ON s.run_key = r.run_key "
                "WHERE s.sweep=? ORDER BY s.position, r.run_key", (sweep,)).fetchall()
        out = []
        for row in rows:
            d = dict(zip(cols, row[: len(cols)]))
            swept = json.loads(row[len(cols)]) if row[len(cols)] is not None else json.loads(d["swept_json"])
            meta = {k: d[k] for k in cols if k not in {"run_key", "config_json", "swept_json", "seed"}}
            for k in ("stage_dirs_json", "computed_json", "versions_json"):
                meta[k[: -len("_json")]] = json.loads(meta.pop(k) or "null")
            out.append(StoredRun(d["run_key"], json.loads(d["config_json"]), swept, d["seed"],
                                 metrics.get(d["run_key"], {}), meta, members.get(d["run_key"], [])))
            configs[d["run_key"]] = d["config_json"]
        if superseded:
            return out
        order = dict(self.conn.execute("SELECT run_key, rowid FROM runs"))  # recording order breaks ties
        latest: dict[str, StoredRun] = {}
        for run in sorted(out, key=lambda r: (r.meta.get("finished_at") or "", order[r.run_key])):
            latest[configs[run.run_key]] = run
        keep = {r.run_key for r in latest.values()}
        return [r for r in out if r.run_key in keep]


def _migrate(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: the runs gain their dtype (read from their config); the verdicts table is new."""
    row = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    version = row and conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if not version or int(version[0]) != 1:
        return
    conn.execute("ALTER TABLE runs ADD COLUMN dtype TEXT")
    for key, config in conn.execute("SELECT run_key, config_json FROM runs").fetchall():
        conn.execute("UPDATE runs SET dtype=? WHERE run_key=?",
                     (json.loads(config).get("model", {}).get("dtype"), key))
    conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";\n") if s.strip()]
