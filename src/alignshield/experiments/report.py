"""Results tables (mean ± std over seeds per group) and the report: markdown, plots, one HTML page.

Fields are dotted config paths (``align.method``, ``finetune.p``, ``repair.params.alpha``) read from
each run's resolved config, plus ``seed``, ``run_key``, ``sweeps`` and the run metadata
(``wall_seconds``, ``peak_rss_mb``, ``git_revision``, ``versions.torch``, ...).
"""

from __future__ import annotations

import base64
import csv
import fnmatch
import html
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from alignshield.experiments.store import ResultStore, StoredRun
from alignshield.experiments.grid import get_dotted, selector

DEFAULT_METRICS = ("harmful_score/*", "finetune_accuracy/*")
PREFERRED_HS = ("harmful_score/embedded", "harmful_score/keyword")
PREFERRED_FA = ("finetune_accuracy/strict", "finetune_accuracy/accuracy")


class ReportError(ValueError):
    pass


# ------------------------------------------------------------------------------- selection


def field_value(run: StoredRun, name: str) -> Any:
    if name == "seed":
        return run.seed
    if name == "run_key":
        return run.run_key
    if name == "sweeps":
        return ",".join(run.sweeps)
    if name in run.meta:
        return run.meta[name]
    if name.startswith("versions."):
        return (run.meta.get("versions") or {}).get(name.split(".", 1)[1])
    return get_dotted(run.config, name)


def select(runs: list[StoredRun], filters: Iterable[str]) -> list[StoredRun]:
    """Runs whose fields equal the ``field=value`` filters (typed as YAML, or compared as text); a field given
    several times matches any of its values."""
    selected = selector(filters)
    return [r for r in runs if selected(lambda name: field_value(r, name))]


def metric_names(runs: list[StoredRun], patterns: Iterable[str] | None = None) -> list[str]:
    """Metrics present in ``runs`` matching the patterns (exact names or globs), in pattern order."""
    present = sorted({m for r in runs for m in r.metrics})
    out: list[str] = []
    for pattern in patterns or DEFAULT_METRICS:
        for name in present:
            if fnmatch.fnmatchcase(name, pattern) and name not in out:
                out.append(name)
    return out


def swept_fields(runs: list[StoredRun], exclude: Iterable[str] = ("seed",)) -> list[str]:
    """The union of the runs' swept fields (first-seen order), without ``exclude``."""
    out: list[str] = []
    for r in runs:
        for k in r.swept:
            if k not in out and k not in exclude:
                out.append(k)
    return out


# ------------------------------------------------------------------------------- aggregation


@dataclass
class Stat:
    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 2) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Group:
    values: tuple
    runs: list[StoredRun]
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})


def stat(values: list[float]) -> Stat | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def aggregate(runs: list[StoredRun], group_by: list[str], metrics: list[str]) -> list[Group]:
    """Groups of runs with equal ``group_by`` values (in first-seen order) and, per metric, the mean
    and sample standard deviation over the group's runs (its seeds, when the other fields are grouped)."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple(_hashable(field_value(r, f)) for f in group_by)
        groups.setdefault(key, Group(key, [])).runs.append(r)
    for g in groups.values():
        for m in metrics:
            s = stat([r.metrics[m] for r in g.runs if m in r.metrics])
            if s is not None:
                g.stats[m] = s
    return list(groups.values())


def _hashable(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True, sort_keys=True).strip()
    return v


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)


def pooled_interval(g: Group, metric: str) -> tuple[float, float] | None:
    """For a harmful score: the 95 % Wilson interval (percent) of the group's answers pooled over its
    runs (flagged = sum of score x prompts / 100 over prompts x runs); None for other metrics."""
    from alignshield.stats import wilson

    if not metric.startswith("harmful_score/"):
        return None
    pairs = [(r.metrics[metric], r.metrics.get("harmful_prompts")) for r in g.runs if metric in r.metrics]
    if not pairs or any(n is None for _, n in pairs):
        return None
    k, n = sum(v * n / 100 for v, n in pairs), int(sum(n for _, n in pairs))
    lo, hi = wilson(k, n)
    return round(100 * lo, 1), round(100 * hi, 1)


def cell(g: Group, metric: str) -> str:
    """``mean ± std`` over the group's runs, and for a harmful score its pooled interval ``[lo, hi]``."""
    if metric not in g.stats:
        return ""
    ci = pooled_interval(g, metric)
    return g.stats[metric].text() + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def results_table(groups: list[Group], group_by: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = [*group_by, "n", "seeds", *metrics]
    rows = []
    for g in groups:
        rows.append([*(fmt(v) for v in g.values), str(len(g.runs)), ",".join(map(str, g.seeds)),
                     *(cell(g, m) for m in metrics)])
    return header, rows


def comparisons(store, groups: list[Group], group_by: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    """Paired comparisons (``stats.paired_comparison``) of the harmful score ``metric`` between every two
    groups that differ in exactly one ``group_by`` field and share seeds and prompts, from the per-prompt
    verdicts in the results database. Groups without stored verdicts are skipped."""
    from itertools import combinations

    from alignshield.stats import paired_comparison

    judge = metric.removeprefix("harmful_score/")
    flags = [{r.seed: store.verdicts(r.run_key, judge) for r in reversed(g.runs)} for g in groups]
    header = ["A", "B", "differs in", "A − B (points)", "95 % interval", "p", "seeds × prompts"]
    rows = []
    for (i, a), (j, b) in combinations(enumerate(groups), 2):
        differ = [f for f, x, y in zip(group_by, a.values, b.values) if x != y]
        if len(differ) != 1:
            continue
        result = paired_comparison({s: v for s, v in flags[i].items() if v}, {s: v for s, v in flags[j].items() if v})
        if result is None:
            continue
        label = [", ".join(f"{f}={fmt(v)}" for f, v in zip(group_by, g.values)) or "all" for g in (a, b)]
        rows.append([*label, differ[0], f"{result.diff:+.1f}", f"[{result.low:+.1f}, {result.high:+.1f}]",
                     "< 0.001" if result.p < 0.001 else f"{result.p:.3f}", f"{result.seeds} × {result.prompts}"])
    return header, rows


def write_csv(path: str | Path, groups: list[Group], group_by: list[str], metrics: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*group_by, "n", "seeds",
                    *(f"{m} {s}" for m in metrics for s in ("mean", "std", "ci95_low", "ci95_high"))])
        for g in groups:
            cells = []
            for m in metrics:
                s, ci = g.stats.get(m), pooled_interval(g, m)
                cells += ["" if s is None else repr(s.mean), "" if s is None or s.std is None else repr(s.std),
                          *(("", "") if ci is None else ci)]
            w.writerow([*(fmt(v) for v in g.values), len(g.runs), " ".join(map(str, g.seeds)), *cells])


# ------------------------------------------------------------------------------- the report


@dataclass
class Figure:
    title: str
    path: Path
    caption: str


@dataclass
class Table:
    title: str | None
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    name: str
    runs: list[StoredRun]
    spec: dict[str, Any]
    header: list[str]
    rows: list[list[str]]
    run_header: list[str]
    run_rows: list[list[str]]
    figures: list[Figure]
    notes: list[str]
    comparison_header: list[str] = field(default_factory=list)
    comparison_rows: list[list[str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    """The grid's declared tables (``tables:``), shown instead of ``header`` and ``rows``."""

    @property
    def shown_tables(self) -> list[Table]:
        return self.tables or [Table(None, self.header, self.rows)]


@dataclass
class Report:
    markdown: Path
    html: Path | None
    figures: list[Path]
    sections: list[str]


def build_report(
    output_dir: str | Path,
    out: str | Path | None = None,
    *,
    sweeps: list[str] | None = None,
    hs_metric: str | None = None,
    fa_metric: str | None = None,
    html_page: bool = True,
) -> Report:
    """Write ``report.md``, one PNG per supported plot and ``report.html`` (PNGs embedded) to ``out``
    (default ``<output_dir>/report``): one section per sweep in the database."""
    output_dir = Path(output_dir)
    out = Path(out) if out else output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with ResultStore.in_dir(output_dir, readonly=True) as store:
        known = store.sweeps()
        names = sweeps or list(known)
        missing = [n for n in names if n not in known]
        if missing:
            raise ReportError(f"no sweep {missing[0]!r} in {store.path}. Known: {', '.join(known) or '(none)'}")
        from alignshield.experiments import attack_report

        sections, attacks = [], []
        for n in names:
            runs, spec = store.runs(n), known[n]["spec"]
            if attack_report.is_attack(spec):  # an `alignshield attack` study
                attacks.append((n, runs, spec))
                sections.append(attack_report.section(n, runs, spec, out))
                continue
            sec = _section(n, runs, spec, out, hs_metric, fa_metric)
            hs = _pick(runs, hs_metric, PREFERRED_HS, "harmful_score/")
            if hs:
                groups = aggregate(runs, swept_fields(runs), [hs])
                sec.comparison_header, sec.comparison_rows = comparisons(store, groups, swept_fields(runs), hs)
            sections.append(sec)
        if attacks:
            sections.append(attack_report.summary(attacks))
    md = out / "report.md"
    md.write_text(_markdown(sections, output_dir), encoding="utf-8")
    page = None
    if html_page:
        page = out / "report.html"
        page.write_text(_html(sections, output_dir), encoding="utf-8")
    return Report(md, page, [f.path for s in sections for f in s.figures], [s.name for s in sections])


def _pick(runs: list[StoredRun], wanted: str | None, preferred: tuple[str, ...], prefix: str) -> str | None:
    present = {m for r in runs for m in r.metrics}
    if wanted:
        if wanted not in present:
            raise ReportError(f"metric {wanted!r} not in the results; present: {', '.join(sorted(present))}")
        return wanted
    for m in preferred:
        if m in present:
            return m
    return next((m for m in sorted(present) if m.startswith(prefix)), None)


def _section(name: str, runs: list[StoredRun], spec: dict, out: Path, hs: str | None, fa: str | None) -> Section:
    fields = swept_fields(runs)
    metrics = metric_names(runs)
    groups = aggregate(runs, fields, metrics)
    header, rows = results_table(groups, fields, metrics)
    hs = _pick(runs, hs, PREFERRED_HS, "harmful_score/")
    fa = _pick(runs, fa, PREFERRED_FA, "finetune_accuracy/")
    run_header = ["run", *swept_fields(runs, exclude=()), *(m for m in (hs, fa) if m), "wall s", "peak RSS MB",
                  "computed"]
    run_rows = [[r.run_key, *(fmt(field_value(r, f)) for f in swept_fields(runs, exclude=())),
                 *(fmt(r.metrics.get(m)) for m in (hs, fa) if m), fmt(r.meta.get("wall_seconds")),
                 fmt(r.meta.get("peak_rss_mb")), ",".join(r.meta.get("computed") or [])] for r in runs]
    notes = _notes(runs)
    tables = [declared_table(runs, table, notes) for table in spec.get("tables") or []]
    figures = _figures(name, runs, spec, out, hs, fa, notes) if hs else []
    if not hs:
        notes.append("no harmful-score metric in these runs: nothing to plot")
    return Section(name, runs, spec, header, rows, run_header, run_rows, figures, notes, tables=tables)


def declared_table(runs: list[StoredRun], table: dict, notes: list[str]) -> Table:
    """A table the grid declares (``tables:`` in the grid file): a row per ``group_by`` combination, the
    ``metrics`` (names or globs; default: the usual columns) as mean ± std over the rows' runs."""
    metrics = metric_names(runs, table.get("metrics") or None)
    missing = [m for m in table.get("metrics") or [] if not metric_names(runs, [m])]
    if missing:
        notes.append(f"table {table.get('title') or ', '.join(table['group_by'])}: no metric {', '.join(missing)} "
                     "in these runs")
    groups = aggregate(runs, table["group_by"], metrics)
    return Table(table.get("title"), *results_table(groups, table["group_by"], metrics))


def _notes(runs: list[StoredRun]) -> list[str]:
    notes = []
    revs = sorted({r.meta.get("git_revision") or "unknown" for r in runs})
    versions = sorted({", ".join(f"{k} {v}" for k, v in sorted((r.meta.get("versions") or {}).items()))
                       for r in runs} - {""})
    models = sorted({str(get_dotted(r.config, "model.name")) for r in runs})
    notes.append(f"{len(runs)} runs; model {', '.join(models)}; seeds "
                 f"{', '.join(map(str, sorted({r.seed for r in runs})))}")
    notes.append(f"git revision(s): {', '.join(revs)}")
    notes.extend(f"versions: {v}" for v in versions)
    wall = sum(r.meta.get("wall_seconds") or 0 for r in runs)
    rss = max((r.meta.get("peak_rss_mb") or 0 for r in runs), default=0)
    notes.append(f"wall time recorded {wall / 60:.1f} min (a stage shared by several runs is charged to the first "
                 f"that computed it); largest peak RSS {rss:.0f} MB")
    return notes


# ------------------------------------------------------------------------------- plots


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _grid_axis(spec: dict, fieldname: str) -> dict:
    """The recorded grid axis that sweeps ``fieldname`` (its zip partners are the axis's other fields)."""
    return next((axis for axis in spec.get("axes", []) if fieldname in axis.get("fields", [])), {"fields": [fieldname]})


def _determined_by(axis: dict, runs: list[StoredRun], x: str, other: str) -> bool:
    """Whether every value of ``x`` comes with a single value of ``other`` (both on ``axis``): in the grid's
    zip when the database recorded it (a partial sweep must not look lockstep), else in these runs."""
    if "values" in axis:
        fields = axis["fields"]
        pairs = [(row[fields.index(x)], row[fields.index(other)]) for row in axis["values"]]
    else:
        pairs = [(field_value(r, x), field_value(r, other)) for r in runs]
    seen: dict[Any, Any] = {}
    return all(seen.setdefault(_hashable(a), _hashable(b)) == _hashable(b) for a, b in pairs)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _figures(name: str, runs: list[StoredRun], spec: dict, out: Path, hs: str, fa: str | None,
             notes: list[str]) -> list[Figure]:
    """The grid's declared ``plots`` when it has them, else the plots the swept fields support: the
    harmful score against every numeric swept field, and against the accuracy."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        notes.append("matplotlib is not installed (pip install 'alignshield[plot]'): tables only")
        return []
    if spec.get("plots"):
        return [_declared(name, runs, plot, out, hs, notes) for plot in spec["plots"]]
    figures = []
    swept = swept_fields(runs)
    plotted: list[str] = []
    for x in swept:
        values = {_hashable(field_value(r, x)) for r in runs if hs in r.metrics}
        if len(values) < 2 or not all(_is_number(v) for v in values):
            continue
        axis = _grid_axis(spec, x)
        # a zip partner that moves in lockstep with x labels the same line, which an earlier plot may
        # already show; one that takes several values at one x (a method, at rho = 2) splits the lines
        lockstep = {f for f in axis["fields"] if f != x and _determined_by(axis, runs, x, f)}
        if any(y in lockstep and _determined_by(axis, runs, y, x) for y in plotted):
            continue
        plotted.append(x)
        series = [f for f in swept if f != x and f not in lockstep]
        figures.append(_line(name, runs, x, hs, series, out, note=f" (zipped with {', '.join(sorted(lockstep))})"
                             if lockstep else ""))
    if fa:
        if len([g for g in aggregate(runs, swept, [hs, fa]) if hs in g.stats and fa in g.stats]) >= 2:
            figures.append(_scatter(name, runs, fa, hs, swept, out, slug="hs-vs-fa",
                                    title=f"{name}: harmful score vs finetune accuracy"))
    return figures


def _declared(name: str, runs: list[StoredRun], plot: dict, out: Path, hs: str, notes: list[str]) -> Figure:
    """A plot the grid declares (``plots:`` in the grid file): a line over a swept ``x``, or a scatter of
    group means when ``x`` is a metric; with ``facets``, one such panel per combination of their values."""
    y, series, facets = plot.get("y") or hs, list(plot.get("series") or []), list(plot.get("facets") or [])
    swept = swept_fields(runs, exclude=())
    if plot["x"] in swept:
        return _line(name, runs, plot["x"], y, series, out, title=plot.get("title"), facets=facets)
    return _scatter(name, runs, plot["x"], y, series, out, slug=f"{_slug(y)}-vs-{_slug(plot['x'])}",
                    title=plot.get("title") or f"{name}: {y} vs {plot['x']}", facets=facets)


def _line(name: str, runs: list[StoredRun], x: str, y: str, series: list[str], out: Path, note: str = "",
          title: str | None = None, facets: list[str] = ()) -> Figure:
    """``y`` (mean over seeds, error bars: std) against the swept field ``x``, one line per ``series``;
    with ``facets``, one such panel per combination of their values."""
    order = [label for label, _ in _series(runs, series)]  # a series has one colour in every panel
    fig, panels = _panels(runs, facets, title or f"{name}: {y.split('/')[0].replace('_', ' ')} vs {x}",
                          f"{y} (%)", (6.4, 4.2))
    for ax, subset in panels:
        for label, group in _series(subset, series):
            points = sorted((p for p in aggregate(group, [x], [y]) if y in p.stats), key=lambda p: p.values[0])
            ax.errorbar([p.values[0] for p in points], [p.stats[y].mean for p in points],
                        yerr=[p.stats[y].std or 0.0 for p in points], capsize=3, label=label or None,
                        **_style(order.index(label)))
        if _log_scale(x, {_hashable(field_value(r, x)) for r in subset if y in r.metrics}):
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if series:
            _legend_below(ax, " / ".join(series), fontsize=8)
    prefix = "hs" if y.startswith("harmful_score/") else _slug(y)
    path = out / f"{_slug(name)}-{prefix}-vs-{_slug(x)}{_facet_slug(facets)}.png"
    fig.savefig(path, bbox_inches="tight")
    return Figure(f"{y} vs {x}{_facet_title(facets)}", path,
                  f"Mean over seeds (error bars: sample std) of {y} against {x}{note}"
                  + (f", one line per {' / '.join(series)}" if series else "") + _facet_caption(facets) + ".")


def _scatter(name: str, runs: list[StoredRun], x: str, y: str, groups_by: list[str], out: Path, *, slug: str,
             title: str, facets: list[str] = ()) -> Figure:
    """One point per group of ``groups_by`` (mean over seeds, bars: std) at (metric ``x``, metric ``y``);
    with ``facets``, one such panel per combination of their values."""
    groups = [g for g in aggregate(runs, groups_by, [y, x]) if y in g.stats and x in g.stats]
    # many groups: one style (and legend entry) per value of the first field, so the legend stays readable
    by_first = len(groups) > 16 and len({g.values[0] for g in groups}) <= 16
    firsts = list(dict.fromkeys(g.values[0] for g in groups)) if by_first else []
    order = {g.values: i for i, g in enumerate(groups)}  # a group has one style in every panel
    fig, panels = _panels(runs, facets, title, f"{y} (%)", (6.4, 4.6))
    for ax, subset in panels:
        labelled: set = set()
        for g in (g for g in aggregate(subset, groups_by, [y, x]) if y in g.stats and x in g.stats):
            if by_first:
                style, label = _style(firsts.index(g.values[0])), fmt(g.values[0])
                label = None if label in labelled else label
                labelled.add(fmt(g.values[0]))
            else:
                style, label = _style(order[g.values]), " / ".join(fmt(v) for v in g.values) or "all"
            ax.errorbar(g.stats[x].mean, g.stats[y].mean, xerr=g.stats[x].std or 0.0, yerr=g.stats[y].std or 0.0,
                        capsize=3, linestyle="none", label=label, **style)
        ax.set_xlabel(f"{x} (%)")
        ax.grid(True, alpha=0.3)
        if by_first:
            _legend_below(ax, groups_by[0], fontsize=7)
        elif len(groups) <= 16:
            _legend_below(ax, " / ".join(groups_by) or None, fontsize=7)
    path = out / f"{_slug(name)}-{slug}{_facet_slug(facets)}.png"
    fig.savefig(path, bbox_inches="tight")
    caption = f"One point per {' / '.join(groups_by) or 'group'} (mean over seeds, bars: std)"
    if y.startswith("harmful_score/") and x.startswith("finetune_accuracy/"):
        caption += "; lower and further right is better"
    return Figure(("harmful score vs finetune accuracy" if slug == "hs-vs-fa" else f"{y} vs {x}")
                  + _facet_title(facets), path, caption + _facet_caption(facets) + ".")


def _panels(runs: list[StoredRun], facets: list[str], title: str, ylabel: str,
            size: tuple[float, float]) -> tuple[Any, list[tuple[Any, list[StoredRun]]]]:
    """A figure and its axes, each with the runs it draws: one axes for all the runs without ``facets``,
    else one panel per combination of the facets' values (at most 3 a row, one shared y axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    if not facets:
        fig = MplFigure(figsize=size, dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        return fig, [(ax, runs)]
    subsets = [rs for _, rs in _series(runs, facets)]
    cols = min(len(subsets), 3)
    rows = math.ceil(len(subsets) / cols)
    fig = MplFigure(figsize=(size[0] * 0.8 * cols, (size[1] + 0.4) * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    for unused in axes[len(subsets):]:
        unused.remove()
    fig.suptitle(title)
    for i, (ax, subset) in enumerate(zip(axes, subsets)):
        ax.set_title(", ".join(f"{f}={fmt(_hashable(field_value(subset[0], f)))}" for f in facets), fontsize=10)
        if i % cols == 0:
            ax.set_ylabel(ylabel)
    return fig, list(zip(axes, subsets))


def _facet_slug(facets: list[str]) -> str:
    return f"-by-{_slug('-'.join(facets))}" if facets else ""


def _facet_title(facets: list[str]) -> str:
    return f" by {' / '.join(facets)}" if facets else ""


def _facet_caption(facets: list[str]) -> str:
    return f"; one panel per {' / '.join(facets)}" if facets else ""


def _series(runs: list[StoredRun], fields: list[str]) -> list[tuple[str, list[StoredRun]]]:
    out: dict[tuple, list[StoredRun]] = {}
    for r in runs:
        out.setdefault(tuple(_hashable(field_value(r, f)) for f in fields), []).append(r)
    return [(" / ".join(fmt(v) for v in k), rs) for k, rs in out.items()]


_MARKERS = "osD^vP*Xh<>p"


def _style(i: int) -> dict[str, str]:
    """The i-th series' colour and marker: matplotlib's 10 colours repeat, so past 10 series the marker
    changes too, and no two of the first 120 look alike."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[(i // 10) % len(_MARKERS)]}


def _legend_below(ax: Any, title: str | None, fontsize: int) -> None:
    """Under the axes, where long config labels cannot hide the points."""
    ax.legend(title=title, fontsize=fontsize, title_fontsize=fontsize, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), frameon=False)


def _log_scale(x: str, values: set) -> bool:
    positive = [float(v) for v in values if float(v) > 0]
    if len(positive) != len(values):
        return False
    return "learning_rate" in x or max(positive) / min(positive) >= 100


# ------------------------------------------------------------------------------- writers


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_COMPARISONS = ("Paired comparisons of the harmful score between groups that differ in one field, over the "
                "seeds and prompts they share: A − B in points, 95 % bootstrap interval (seeds and prompts "
                "resampled) and the bootstrap p of the same draws. An interval that spans 0 is no evidence of a difference.")


def _markdown(sections: list[Section], output_dir: Path) -> str:
    parts = ["# alignshield results", "",
             f"From `{output_dir / 'results.sqlite'}`. Cells are mean ± sample std over the runs of a group "
             "(its seeds); `n` runs per group; a harmful score also carries `[lo, hi]`, the 95 % Wilson interval "
             "of the group's answers pooled over its runs. Regenerate with `alignshield report`.", ""]
    for s in sections:
        parts += [f"## {s.name}", "", *(f"- {n}" for n in s.notes), ""]
        for t in s.shown_tables:
            parts += [*((f"**{t.title}**", "") if t.title else ()), _md_table(t.header, t.rows), ""]
        if s.comparison_rows:
            parts += [_COMPARISONS, "", _md_table(s.comparison_header, s.comparison_rows), ""]
        for f in s.figures:
            parts += [f"![{f.title}]({f.path.name})", "", f"*{f.caption}*", ""]
        if s.run_rows:
            parts += ["<details><summary>every run</summary>", "", _md_table(s.run_header, s.run_rows), "",
                      "</details>", ""]
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d232a; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; margin-top: 2.5rem; }
.table { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
th { background: #f3f5f7; } tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #e5e8eb; }
figcaption { font-size: .85rem; color: #57606a; } .notes { color: #57606a; font-size: .85rem; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def td(c: str) -> str:
        num = bool(re.fullmatch(r"[-+0-9.e ±]+", c)) and c.strip() != ""
        return f'<td class="num">{html.escape(c)}</td>' if num else f"<td>{html.escape(c)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(td(c) for c in row) + "</tr>" for row in rows)
    # wide tables (many metrics, zipped params) scroll inside their box instead of running off the page
    return f"<div class=table><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _html(sections: list[Section], output_dir: Path) -> str:
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
             "<meta name=viewport content='width=device-width, initial-scale=1'>",
             f"<title>alignshield results</title><style>{_CSS}</style></head><body>",
             "<h1>alignshield results</h1>",
             f"<p class=notes>From <code>{html.escape(str(output_dir / 'results.sqlite'))}</code>. Cells are mean ± "
             "sample std over the runs of a group (its seeds); <code>n</code> runs per group; a harmful score also "
             "carries [lo, hi], the 95 % Wilson interval of the group's answers pooled over its runs.</p>"]
    for s in sections:
        parts.append(f"<h2 id='{_slug(s.name)}'>{html.escape(s.name)}</h2><ul class=notes>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in s.notes) + "</ul>")
        for t in s.shown_tables:
            parts += [f"<p><strong>{html.escape(t.title)}</strong></p>"] if t.title else []
            parts.append(_html_table(t.header, t.rows))
        if s.comparison_rows:
            parts.append(f"<p class=notes>{html.escape(_COMPARISONS)}</p>")
            parts.append(_html_table(s.comparison_header, s.comparison_rows))
        if s.figures:
            parts.append("<div class=figs>")
            for f in s.figures:
                data = base64.b64encode(f.path.read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(f.title)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
            parts.append("</div>")
        if s.run_rows:
            parts.append("<details><summary>every run</summary>" + _html_table(s.run_header, s.run_rows) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
