"""The grid language: a grid file expands into runs (``Run``: a resolved config and its stage folders).

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
    plots:                      # optional: what the report draws (default: inferred from the axes)
      - {x: finetune.p, series: [align.method], facets: [seed]}
    tables:                     # optional: what the report tables (default: one row per swept setting)
      - {group_by: [align.method, finetune.p], metrics: ["harmful_score/*"]}

The base is: defaults <- preset <- config files <- ``overrides`` (a mapping value merges into the
base like a config file) <- command-line ``a.b=c`` overrides (which replace, as in ``alignshield
run``). A swept field cannot also be overridden, and ``output_dir`` cannot be swept. ``restrict``
selects a slice (``--where``); ``sweep.run_sweep`` runs one.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from alignshield.config import (ConfigError, RunConfig, Strict, _deep_merge, format_validation, _set_dotted,
                                load_config, parse_assignment, read_mapping)

GRIDS_DIR = Path(__file__).resolve().parent.parent / "resources" / "grids"
TOP_KEYS = ("name", "description", "preset", "config", "overrides", "grid", "zip", "plots", "tables")


class PlotSpec(Strict):
    """A plot the report draws for this grid (``plots:`` in the grid file); without any, the report
    draws what the swept fields support."""

    x: str
    """A swept field (a line per ``series`` over its values) or a metric (one point per group)."""
    y: str | None = None
    """The metric on the y axis; default: the report's harmful score."""
    series: list[str] = []
    """Swept fields: one line (or point) per combination of their values."""
    facets: list[str] = []
    """Swept fields (neither ``x`` nor a series): one panel per combination of their values, side by side
    in one figure with a shared y axis, each drawn as the plot without facets would be on those runs."""
    title: str | None = None
    """The plot's title; default: "<grid>: y vs x"."""


class TableSpec(Strict):
    """A table the report shows for this grid (``tables:`` in the grid file); without any, the report
    shows one table with a row per combination of the swept fields other than ``seed``."""

    group_by: list[str]
    """Swept fields: one row per combination of their values, mean ± std over the runs that share it
    (over the seeds, and over any other swept field left out)."""
    metrics: list[str] = []
    """The columns: metric names or globs (``harmful_score/*``); default: the report's usual columns,
    every harmful score and finetune accuracy."""
    title: str | None = None
    """A heading above the table; default: none."""


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
    plots: list[dict[str, Any]] = field(default_factory=list)
    """The grid's declared plots (``PlotSpec`` as mappings), recorded with the sweep for the report."""
    tables: list[dict[str, Any]] = field(default_factory=list)
    """The grid's declared tables (``TableSpec`` as mappings), recorded with the sweep for the report."""

    @property
    def output_dir(self) -> Path:
        return Path(self.runs[0].config.output_dir) if self.runs else Path(self.base.get("output_dir", "runs"))

    @property
    def swept_fields(self) -> list[str]:
        return [f for axis in self.axes for f in axis.fields]

    def spec(self) -> dict[str, Any]:
        points = math.prod(len(a.values) for a in self.axes)
        return {"axes": [{"fields": a.fields, "values": [list(v) for v in a.values]} for a in self.axes],
                "runs": points - len(self.duplicates),  # the whole grid's, whatever ``where`` selects
                **({"plots": self.plots} if self.plots else {}), **({"tables": self.tables} if self.tables else {})}


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
    plots = _plots(data.get("plots") or [], swept, where)
    tables = _tables(data.get("tables") or [], swept, where)

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
    return Sweep(name, str(source) if source else None, base_info, axes, runs, duplicates, plots=plots, tables=tables)


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


def _plots(plots: Any, swept: list[str], where: str) -> list[dict[str, Any]]:
    """The declared plots, validated: series and facets are swept fields (a facet neither x nor a series),
    x is a swept field or a metric name."""
    out = []
    for i, item in enumerate(_specs(plots, "plots", "{x, y, series, facets, title}", where)):
        plot = _spec(PlotSpec, item if isinstance(item, dict) else {"x": item}, f"{where}: plots[{i}]")
        _swept_only(plot.series, swept, f"{where}: plots[{i}].series")
        _swept_only(plot.facets, swept, f"{where}: plots[{i}].facets")
        if plot.x not in swept and "/" not in plot.x:
            raise ConfigError(f"{where}: plots[{i}].x={plot.x!r} is neither a swept field ({', '.join(swept)}) "
                              "nor a metric (e.g. finetune_accuracy/strict)")
        twice = [f for f in plot.facets if f == plot.x or f in plot.series]
        if twice:
            raise ConfigError(f"{where}: plots[{i}].facets {twice} are also the plot's x or a series; "
                              "a field splits a plot one way only")
        out.append(plot.model_dump())
    return out


def _tables(tables: Any, swept: list[str], where: str) -> list[dict[str, Any]]:
    """The declared tables, validated: rows group by swept fields; columns are metrics, not config fields."""
    out = []
    for i, item in enumerate(_specs(tables, "tables", "{group_by, metrics, title}", where)):
        table = _spec(TableSpec, item, f"{where}: tables[{i}]")
        _swept_only(table.group_by, swept, f"{where}: tables[{i}].group_by")
        configured = [m for m in table.metrics if m in swept]
        if configured:
            raise ConfigError(f"{where}: tables[{i}].metrics {configured} are swept fields, not metrics "
                              "(e.g. harmful_score/embedded, finetune_accuracy/*); rows group by swept fields")
        out.append(table.model_dump())
    return out


def _specs(items: Any, key: str, shape: str, where: str) -> list:
    if not isinstance(items, list):
        raise ConfigError(f"{where}: {key} is a list of {shape} mappings")
    return items


def _spec(model: type[Strict], item: Any, where: str) -> Any:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: a mapping of {', '.join(model.model_fields)}, got {item!r}")
    try:
        return model(**item)
    except ValidationError as err:
        raise ConfigError(format_validation(err, prefix=where, model=model)) from None


def _swept_only(fields: list[str], swept: list[str], where: str) -> None:
    unknown = [f for f in fields if f not in swept]
    if unknown:
        raise ConfigError(f"{where} {unknown} are not swept; swept: {', '.join(swept) or 'none'}")


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
        raise ConfigError(f"{where}:\n{format_validation(err, model=RunConfig)}") from None


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
