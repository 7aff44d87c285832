"""Sweeps beyond one machine: one job per slice of a grid, submitted with submitit (SLURM, or local
processes to try it out).

``alignshield sweep GRID --launcher slurm --slice-by seed`` submits one job per value of ``seed``;
each job runs ``alignshield sweep GRID --where seed=VALUE`` (the same grid, preset, config files and
overrides) into the one shared ``output_dir``. Jobs share finished stages through the run folder,
whose per-stage locks already let slices run at once (experiments.md), so the output folder must
be on storage every node sees. Each job's log is in ``<output_dir>/.submitit/``.
"""

from __future__ import annotations

from typing import Any, Callable

from alignshield.config import ConfigError, parse_assignment
from alignshield.experiments.grid import Sweep, load_sweep, restrict
from alignshield.experiments.sweep import Outcome, run_sweep

LAUNCHERS = ("slurm", "local")


def run_slice(grid: str, preset: str | None, files: list[str], overrides: list[str], where: list[str]) -> dict:
    """What one job runs: the grid restricted to ``where``, computed and recorded (picklable arguments)."""
    outcome = run_sweep(restrict(load_sweep(grid, preset=preset, files=files, overrides=overrides), where))
    return {"computed": outcome.computed, "cached": outcome.cached, "failed": outcome.failed}


def slices(plan: Sweep, field: str) -> list[list[str]]:
    """One ``--where`` filter list per value the plan's runs take for ``field`` (in grid order)."""
    if field not in plan.swept_fields:
        raise ConfigError(f"--slice-by {field}: not a swept field of the grid; swept: {', '.join(plan.swept_fields)}")
    values: list[Any] = []
    for run in plan.runs:
        if run.swept[field] not in values:
            values.append(run.swept[field])
    return [[f"{field}={_text(v)}"] for v in values]


def submit(plan: Sweep, launcher: str, *, grid: str, preset: str | None, files: list[str], overrides: list[str],
           where: list[str], slice_by: str, parameters: dict[str, Any], wait: bool = True,
           echo: Callable[[str], None] = lambda _m: None) -> Outcome:
    """Submit one job per slice; with ``wait``, collect their outcomes (a failed job raises)."""
    import submitit

    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    folder = plan.output_dir / ".submitit"
    executor = (submitit.AutoExecutor(folder=folder, cluster="slurm") if launcher == "slurm"
                else submitit.LocalExecutor(folder=folder))
    if launcher == "slurm":
        executor.update_parameters(name=f"alignshield-{plan.name}", **parameters)
    elif parameters:
        executor.update_parameters(**parameters)
    jobs = []
    with executor.batch():
        for part in slices(plan, slice_by):
            jobs.append((part, executor.submit(run_slice, grid, preset, list(map(str, files)), list(overrides),
                                               [*where, *part])))
    for part, job in jobs:
        echo(f"submitted {' '.join(part)}: job {job.job_id} (log in {folder})")
    outcome = Outcome()
    if not wait:
        return outcome
    for part, job in jobs:
        result = job.result()  # re-raises the job's exception, with its traceback
        outcome.computed += result["computed"]
        outcome.cached += result["cached"]
        outcome.failed += [tuple(f) for f in result["failed"]]
        echo(f"{' '.join(part)}: {len(result['computed'])} computed, {len(result['cached'])} already done")
    return outcome


def _text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def parse_parameters(items: list[str]) -> dict[str, Any]:
    """``--slurm key=value`` pairs (submitit's ``slurm_*`` / generic parameters), values read as YAML."""
    return dict(parse_assignment(item, "--slurm", "key=value, e.g. slurm_partition=gpu or timeout_min=600")[:2]
                for item in items)


