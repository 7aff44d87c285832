"""Sweeps: a grid file expands into runs; each run is ``stages.run(cfg)``.

A grid file is YAML::

    name: my-sweep              # optional; default: the file name without .yaml
    preset: quick               # optional base preset (as --preset)
    config: [base.yaml]         # optional config files, relative to the grid file (as -c)
    overrides:                  # optional dotted fields of the base (a mapping, or a list of "a.b=c")
      finetune.task: sst2
    grid:                       # the cartesian product of these axes, first axis outermost
      align.method: [sft, vaccine]
      finetune.p: [0.0, 0.1]
      seed: [1, 2, 3]
    zip:                        # optional: fields varied together (lists of equal length); one
      finetune.train.learning_rate: [1.0e-5, 1.0e-4]   # zip axis, or a list of such mappings
      finetune.train.epochs: [20, 5]

The base is: defaults <- preset <- config files <- ``overrides`` (a mapping value merges into the
base like a config file) <- command-line ``a.b=c`` overrides (which replace, as in ``alignshield
run``). A swept field cannot also be overridden, and ``output_dir`` cannot be swept.

Stages are shared through their hash-keyed folders: the alignment reused by every fine-tune that
starts from it, a fine-tune by every repair of it. Finished work is never recomputed: a stage folder
exists only when complete, an interrupted training stage resumes from its checkpoint, and a run
already in the results database (``store``) with its evaluation folder on disk is skipped.
"""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import json
import logging
import math
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import ValidationError

from alignshield import dist
from alignshield.config import (ConfigError, RunConfig, _deep_merge, _format_validation, _set_dotted, load_config,
                                parse_assignment, read_mapping)
from alignshield.experiments.store import ResultStore, RunRecord

log = logging.getLogger(__name__)

GRIDS_DIR = Path(__file__).resolve().parent.parent / "resources" / "grids"
TOP_KEYS = ("name", "description", "preset", "config", "overrides", "grid", "zip")
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "alignshield")


# --------------------------------------------------------------------------------- the grid


@dataclass
class Axis:
    """One dimension of the product: a single field, or several zipped fields varied together."""

    fields: list[str]
    values: list[tuple]


@dataclass
class Run:
    position: int
    swept: dict[str, Any]
    """The swept fields and their values, read back from the validated config (typed)."""
    config: RunConfig
    """Resolved: every method parameter spelled out."""
    key: str
    dirs: dict[str, Path]


@dataclass
class Sweep:
    name: str
    source: str | None
    base: dict[str, Any]
    axes: list[Axis]
    runs: list[Run]
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    """(position, position of the identical earlier run) for grid points that are the same run."""
    where: list[str] = field(default_factory=list)
    """The ``field=value`` filters that selected ``runs`` from the grid (``restrict``); empty: all."""

    @property
    def output_dir(self) -> Path:
        return Path(self.runs[0].config.output_dir) if self.runs else Path(self.base.get("output_dir", "runs"))

    @property
    def swept_fields(self) -> list[str]:
        return [f for axis in self.axes for f in axis.fields]

    def spec(self) -> dict[str, Any]:
        points = math.prod(len(a.values) for a in self.axes)
        return {"axes": [{"fields": a.fields, "values": [list(v) for v in a.values]} for a in self.axes],
                "runs": points - len(self.duplicates)}  # the whole grid's, whatever ``where`` selects


def known_grids() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def find_grid(name_or_path: str | Path) -> Path:
    """A grid file by path, or a shipped grid by name (``smoke``, ``embedded-main``, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = GRIDS_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"grid {str(name_or_path)!r}: no such file, and no shipped grid of that name. "
                      f"Shipped: {', '.join(known_grids())}")


def load_sweep(
    grid: str | Path,
    *,
    preset: str | None = None,
    files: list[str | Path] = (),
    overrides: list[str] = (),
) -> Sweep:
    """Read a grid file and expand it; ``preset`` replaces the grid's preset, ``files`` and
    ``overrides`` (``a.b=c``) apply after the grid's own base config."""
    path = find_grid(grid)
    data = read_mapping(path, "grid", f"a grid file holds a mapping with keys {', '.join(TOP_KEYS)}")
    return expand(data, source=path, preset=preset, files=files, overrides=overrides)


def expand(
    data: dict[str, Any],
    *,
    source: Path | None = None,
    preset: str | None = None,
    files: list[str | Path] = (),
    overrides: list[str] = (),
) -> Sweep:
    where = str(source) if source else "grid"
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a grid file has {', '.join(TOP_KEYS)}")
    axes = _axes(data.get("grid") or {}, data.get("zip") or [], where)
    swept = [f for a in axes for f in a.fields]
    if "output_dir" in swept:
        raise ConfigError(f"{where}: output_dir cannot be swept: a sweep, its stages and its database share one folder")

    # the base: defaults <- preset <- config files <- grid overrides <- command-line overrides
    grid_files = data.get("config") or []
    if isinstance(grid_files, (str, Path)):
        grid_files = [grid_files]
    here = source.parent if source else Path.cwd()
    all_files = [here / f for f in grid_files] + [Path(f) for f in files]
    base = load_config(all_files, [], preset=preset or data.get("preset")).model_dump(mode="json")
    grid_pairs = _override_pairs(data.get("overrides") or {}, where)
    cli_pairs = _override_pairs(list(overrides), "command line")
    pairs = grid_pairs + cli_pairs
    for i, (key, value) in enumerate(pairs):
        if key in swept:
            raise ConfigError(f"{key} is swept by the grid ({where}); it cannot also be overridden")
        current = get_dotted(base, key)
        if i < len(grid_pairs) and isinstance(value, dict) and isinstance(current, dict):
            _deep_merge(current, copy.deepcopy(value))  # the grid's overrides merge like a config file
        else:
            _set_dotted(base, key, value)  # command-line a.b=c replaces, as in `alignshield run`
    _validate(base, f"{where}: base config")

    runs: list[Run] = []
    duplicates: list[tuple[int, int]] = []
    seen: dict[str, int] = {}
    points = itertools.product(*[a.values for a in axes]) if axes else [()]
    from alignshield import stages

    for position, combo in enumerate(points):
        run_data = copy.deepcopy(base)
        assigned = {f: v for axis, vals in zip(axes, combo) for f, v in zip(axis.fields, vals)}
        for key, value in assigned.items():
            _set_dotted(run_data, key, copy.deepcopy(value))
        label = ", ".join(f"{k}={v}" for k, v in assigned.items()) or "the base config"
        cfg = stages.resolve(_validate(run_data, f"{where}: run {position} ({label})"))
        dumped = cfg.model_dump(mode="json")
        typed = {k: get_dotted(dumped, k) for k in assigned}
        dirs = stages.stage_dirs(cfg)
        key = dirs["evaluate"].name
        if key in seen:
            duplicates.append((position, seen[key]))
            continue
        seen[key] = position
        runs.append(Run(position, typed, cfg, key, dirs))
    name = str(data.get("name") or (source.stem if source else "sweep"))
    base_info = {"preset": preset or data.get("preset"), "config": [str(f) for f in all_files],
                 "overrides": {k: v for k, v in pairs}, "output_dir": base["output_dir"]}
    return Sweep(name, str(source) if source else None, base_info, axes, runs, duplicates)


def restrict(sweep: Sweep, where: list[str]) -> Sweep:
    """The runs whose resolved config has every ``field=value`` (e.g. ``seed=1``), keeping their
    grid positions. Sweeps over different slices of one grid can run at once into the same output
    folder (one per GPU, say): stages they share are built once, by whichever process gets there first."""
    selected = selector(where)
    runs = [r for r in sweep.runs if selected(lambda name: _run_field(r, name))]
    if not runs:
        raise ConfigError(f"--where {' '.join(where)}: no run of sweep {sweep.name} matches "
                          f"(swept fields: {', '.join(sweep.swept_fields) or 'none'})")
    return replace(sweep, runs=runs, where=list(where))


def _run_field(run: Run, name: str) -> Any:
    return get_dotted(run.config.model_dump(mode="json"), name)


def parse_filters(filters: Iterable[str]) -> list[tuple[str, Any, str]]:
    """``field=value`` strings as (field, value typed as YAML, value as written)."""
    return [parse_assignment(item, "filter", "field=value, e.g. align.method=vaccine") for item in filters]


def selector(filters: Iterable[str]) -> Callable[[Callable[[str], Any]], bool]:
    """A predicate over a run's field getter: every field filtered must match, and a field given several
    times matches any of its values (``seed=1 seed=2`` is seeds 1 or 2)."""
    by_field: dict[str, list[tuple[Any, str]]] = {}
    for key, value, raw in parse_filters(filters):
        by_field.setdefault(key, []).append((value, raw))

    def selected(field: Callable[[str], Any]) -> bool:
        return all(any(matches(field(key), v, raw) for v, raw in wanted) for key, wanted in by_field.items())

    return selected


def matches(actual: Any, wanted: Any, raw: str) -> bool:
    """Does a field's value equal a filter's (typed, numerically with tolerance, or as text)."""
    if actual == wanted:
        return True
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return math.isclose(float(actual), float(raw), rel_tol=1e-9)
        except ValueError:
            return False
    return str(actual) == raw


def _axes(grid: Any, zips: Any, where: str) -> list[Axis]:
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid must map dotted fields to lists of values")
    axes = []
    for key, values in grid.items():
        axes.append(Axis([str(key)], [(v,) for v in _values(key, values, where)]))
    groups = [zips] if isinstance(zips, dict) else zips
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ConfigError(f"{where}: zip must be a mapping of fields to equal-length lists, or a list of them")
    for group in groups:
        if not group:
            continue
        columns = {str(k): _values(k, v, where) for k, v in group.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"{where}: zipped fields need lists of one length, got {lengths}")
        axes.append(Axis(list(columns), list(zip(*columns.values()))))
    fields = [f for a in axes for f in a.fields]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ConfigError(f"{where}: field(s) {repeated} appear on more than one axis")
    return axes


def _values(key: Any, values: Any, where: str) -> list:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: swept field {key} needs a non-empty list of values, got {values!r}")
    return values


def _override_pairs(overrides: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(overrides, dict):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, list):
        return [parse_assignment(item, f"{where}: override", "section.field=value")[:2] for item in overrides]
    raise ConfigError(f"{where}: overrides must be a mapping of dotted fields to values, or a list of a.b=c")


def _validate(data: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig(**data)
    except ValidationError as err:
        raise ConfigError(f"{where}:\n{_format_validation(err, model=RunConfig)}") from None


def get_dotted(data: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


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
    scope = _reset_peak_memory()
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
        rss, gpu = _peak_memory()
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


# ------------------------------------------------------------------------- processes (DDP)


# ------------------------------------------------------------------------- run metadata


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {"versions": versions, "git_revision": git_revision(), "host": platform.node()}


def git_revision() -> str | None:
    """The commit of the alignshield source tree (``+dirty`` with uncommitted changes), or None
    when the package is not in a git checkout (installed from a wheel) or git is missing."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def _reset_peak_memory() -> str:
    """Reset the peak-RSS counter where Linux allows it; returns the scope the next reading covers."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, which ru_maxrss reads
        return "run"
    except OSError:
        return "process"  # ru_maxrss is then the peak since the sweep process started


def _peak_memory() -> tuple[float, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:  # noqa: BLE001
        pass
    return round(rss_mb, 1), gpu
