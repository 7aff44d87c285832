"""The report's sections for attack searches (``alignshield attack``): per study, the worst-case
harmful score at each utility budget epsilon, the cumulative-max curve and the winning attack; across
studies, one row per defence."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alignshield.experiments.attack import cumulative_max, worst_case
from alignshield.experiments.report import Figure, Section, _notes, _slug, fmt
from alignshield.experiments.store import StoredRun

EPSILONS = (0.0, 2.0, 5.0, 10.0, math.inf)


def is_attack(spec: dict[str, Any]) -> bool:
    return spec.get("kind") == "attack"


def trials(runs: list[StoredRun], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's trials in search order: attack config, objective, utility, the objective's interval."""
    objective, utility = spec["objective"], spec["utility"]
    out = []
    for r in runs:
        if r.swept == {"attack": "reference"} or objective not in r.metrics or utility not in r.metrics:
            continue
        out.append({"run": r.run_key, "params": r.swept, "objective": r.metrics[objective],
                    "utility": r.metrics[utility], "low": r.metrics.get(f"ci95/{objective}/low"),
                    "high": r.metrics.get(f"ci95/{objective}/high")})
    return out


def defence_label(spec: dict[str, Any]) -> str:
    return (spec.get("defence") or {}).get("label") or "the attack's base config"


def _interval(t: dict[str, Any] | None) -> str:
    if t is None:
        return "none within budget"
    ci = f" [{fmt(t['low'])}, {fmt(t['high'])}]" if t.get("low") is not None else ""
    return f"{fmt(t['objective'])}{ci}"


def _epsilons(spec: dict[str, Any]) -> list[float]:
    return sorted(set(EPSILONS) | {float(spec["epsilon"])})


def section(name: str, runs: list[StoredRun], spec: dict[str, Any], out: Path) -> Section:
    found = trials(runs, spec)
    ref = spec.get("reference_utility")
    notes = [f"attack {spec['attack']} against {defence_label(spec)}; seed {spec.get('seed')}; "
             f"maximising {spec['objective']} subject to {spec['utility']} >= reference - epsilon",
             f"reference (undefended: {', '.join(f'{k}={v}' for k, v in spec['reference'].items())}): "
             f"{spec['utility']} = {fmt(ref)} (run {spec.get('reference_run')})",
             "the worst case is a maximum over trials, so it is biased upwards (the winner's curse); compare "
             "defences searched with the same attack and budget", *_notes(runs)]
    header = ["epsilon (points)", f"worst-case {spec['objective']} [95 % CI]", spec["utility"], "trial", "attack"]
    rows = []
    for eps in _epsilons(spec) if ref is not None else []:
        w = worst_case(found, ref, eps)
        rows.append([fmt(eps) if eps != math.inf else "unbounded", _interval(w),
                     fmt(w["utility"]) if w else "", str(found.index(w)) if w else "",
                     ", ".join(f"{k}={fmt(v)}" for k, v in w["params"].items()) if w else ""])
    fields = list(spec["space"])
    run_header = ["trial", *fields, spec["objective"], spec["utility"], "within budget", "run"]
    floor = ref - spec["epsilon"] if ref is not None else None
    run_rows = [[str(i), *(fmt(t["params"].get(f)) for f in fields), _interval(t), fmt(t["utility"]),
                 "yes" if floor is not None and t["utility"] >= floor else "no", t["run"]]
                for i, t in enumerate(found)]
    figures = _curve(name, found, floor, spec, out, notes) if found and floor is not None else []
    return Section(name, runs, spec, header, rows, run_header, run_rows, figures, notes)


def summary(studies: list[tuple[str, list[StoredRun], dict[str, Any]]]) -> Section:
    """One row per study: the defence, its seed and budget, the worst case at each epsilon."""
    epsilons = sorted({e for _, _, spec in studies for e in _epsilons(spec)})
    header = ["attack", "defence", "seed", "trials", "reference FA",
              *(f"worst HS, eps {fmt(e) if e != math.inf else 'unbounded'}" for e in epsilons)]
    rows = []
    for _name, runs, spec in studies:
        found, ref = trials(runs, spec), spec.get("reference_utility")
        cells = [_interval(worst_case(found, ref, e)) if ref is not None else "" for e in epsilons]
        rows.append([spec["attack"], defence_label(spec), str(spec.get("seed")), str(len(found)), fmt(ref), *cells])
    notes = ["worst-case harmful score per defence (its 95 % Wilson interval over the prompts); a defence "
             "helps against the adaptive attacker only where its interval lies below another's at the same epsilon"]
    return Section("attack summary", [], {}, header, rows, [], [], [], notes)


def _curve(name: str, found: list[dict[str, Any]], floor: float, spec: dict[str, Any], out: Path,
           notes: list[str]) -> list[Figure]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        notes.append("matplotlib is not installed (pip install 'alignshield[plot]'): tables only")
        return []
    fig = MplFigure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(found)))
    best = cumulative_max(found, floor)
    ax.step(xs, [b if b is not None else math.nan for b in best], where="post", label="best within budget")
    ok = [i for i in xs if found[i]["utility"] >= floor]
    over = [i for i in xs if i not in ok]
    ax.plot(ok, [found[i]["objective"] for i in ok], "o", label="trial within budget")
    ax.plot(over, [found[i]["objective"] for i in over], "x", label="trial over the utility budget")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{spec['objective']} (%)")
    ax.set_title(f"{spec['attack']} vs {defence_label(spec)}"[:90])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"{_slug(name)}-cumulative-max.png"
    fig.savefig(path, bbox_inches="tight")
    return [Figure("worst case found vs trials", path,
                   f"Best {spec['objective']} found so far among trials within epsilon = {fmt(spec['epsilon'])} "
                   "points of the reference accuracy (line), and every trial (markers).")]
