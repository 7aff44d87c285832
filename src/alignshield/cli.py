"""Command line: a thin shell over ``alignshield.stages``. Config = preset + YAML files + a.b=c overrides."""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from alignshield.config import ConfigError, RunConfig, dump_yaml, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file(s), applied in order.")
PresetOpt = typer.Option(None, "--preset", "-p", help="Start from a shipped preset (see `alignshield list`).")
QuickOpt = typer.Option(False, "--quick", help="The smoke-test preset: the whole pipeline in about a minute.")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. finetune.p=0.2 align.method=vaccine")


def _config(config: list[Path] | None, preset: str | None, quick: bool, overrides: list[str] | None) -> RunConfig:
    if quick and preset:
        raise ConfigError("--quick and --preset are exclusive (--quick is --preset quick)")
    from alignshield.stages import resolve

    return resolve(load_config(config or [], overrides or [], preset="quick" if quick else preset))


def _guarded(action: Callable[[], None]) -> None:
    from alignshield.data.jsonl import DataError
    from alignshield.evaluate.judges.base import JudgeLoadError
    from alignshield.models.layers import LayerDiscoveryError
    from alignshield.registry import PluginError, UnknownNameError

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_rich_handler()])
    try:
        action()
    except (ConfigError, DataError, UnknownNameError, JudgeLoadError, LayerDiscoveryError, PluginError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


def _rich_handler():
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, show_time=False)


def _settings_line(cfg: RunConfig) -> str:
    ft, ev = cfg.finetune, cfg.evaluate
    return (
        f"model={cfg.model.name} dtype={cfg.model.dtype} seed={cfg.seed} template={cfg.template} | "
        f"align={cfg.align.method} | finetune={ft.method} task={ft.task} n={ft.n} p={ft.p} "
        f"lr={ft.train.learning_rate} steps={ft.train.max_steps or f'{ft.train.epochs} epochs'} | "
        f"repair={cfg.repair.method} | eval: {ev.harmful.dataset}[{ev.harmful.start}:{ev.harmful.stop}] "
        f"judges={','.join(ev.judges)} max_new_tokens={ev.max_new_tokens} task_n={ev.task_n}"
    )


def print_metrics(cfg: RunConfig, metrics: dict) -> None:
    """Every metric; a harmful score with its 95 % Wilson interval (the ``ci95/`` keys) beside it."""
    table = Table(title="alignshield results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95 % interval", justify="right")
    for key, value in metrics.items():
        if key.startswith("ci95/"):
            continue
        low, high = metrics.get(f"ci95/{key}/low"), metrics.get(f"ci95/{key}/high")
        table.add_row(key, f"{value}", "" if low is None else f"[{low}, {high}]")
    Console().print(table)
    Console().print(f"[dim]{_settings_line(cfg)}[/]")
    if "embedded" in cfg.evaluate.judges:
        Console().print("[dim]harmful_score/embedded is a small proxy judge; its agreement with hand labels of "
                        "this pipeline's answers is measured in docs/judge.md (benchmarks/judge_quality.py).[/]")


def _stage_command(name: str, doc: str):
    def command(
        overrides: Optional[list[str]] = OverridesArg,
        config: Optional[list[Path]] = ConfigOpt,
        preset: Optional[str] = PresetOpt,
        quick: bool = QuickOpt,
    ) -> None:
        def act() -> None:
            from alignshield import stages

            cfg = _config(config, preset, quick, overrides)
            result = getattr(stages, name)(cfg)
            if isinstance(result, dict):
                print_metrics(cfg, result)
                console.print(f"outputs: {stages.stage_dirs(cfg)['evaluate']}")
            else:
                console.print(f"{name} output: {result}")

        _guarded(act)

    command.__doc__ = doc
    app.command(name)(command)


_stage_command("run", "Run align -> finetune -> repair -> evaluate (default: the embedded CPU preset).")
_stage_command("align", "Alignment stage (LoRA #1).")
_stage_command("finetune", "The user's fine-tune (LoRA #2), aligning first if needed.")
_stage_command("repair", "Post-fine-tune repair of the adapter, running earlier stages if needed.")
_stage_command("evaluate", "Harmful Score and Finetune Accuracy of the final model.")


@app.command("config")
def show_config(
    overrides: Optional[list[str]] = OverridesArg,
    config: Optional[list[Path]] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    quick: bool = QuickOpt,
    schema: bool = typer.Option(
        False, "--schema", help="Print the JSON schema of the config (types, defaults, descriptions) instead."),
) -> None:
    """Print the resolved config (every default spelled out) as YAML."""

    def act() -> None:
        if schema:
            if overrides or config or preset or quick:
                raise ConfigError("--schema describes every config and takes no overrides, --config, --preset or "
                                  "--quick (see `alignshield explain FIELD` for one field's resolved value)")
            sys.stdout.write(json.dumps(RunConfig.model_json_schema(), indent=2) + "\n")
        else:
            sys.stdout.write(dump_yaml(_config(config, preset, quick, overrides)))

    _guarded(act)


@app.command("list")
def list_names() -> None:
    """Methods per stage, tasks, datasets, judges and presets."""
    from alignshield.align import ALIGN_METHODS
    from alignshield.config import PRESETS_DIR
    from alignshield.data.pools import DATASETS
    from alignshield.evaluate.judges import JUDGES
    from alignshield.experiments.attack import known_attacks
    from alignshield.experiments.grid import known_grids
    from alignshield.finetune import FINETUNE_METHODS
    from alignshield.repair import REPAIR_METHODS
    from alignshield.tasks import TASKS

    table = Table(show_header=True)
    table.add_column("kind")
    table.add_column("names")
    for kind, names in [
        ("align methods", ALIGN_METHODS.names()),
        ("finetune methods", FINETUNE_METHODS.names()),
        ("repair methods", REPAIR_METHODS.names()),
        ("tasks", TASKS.names()),
        ("datasets", DATASETS.names()),
        ("judges", JUDGES.names()),
        ("presets", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))),
        ("grids", known_grids()),
        ("attacks", known_attacks()),
    ]:
        table.add_row(kind, ", ".join(names))
    Console().print(table)


# ------------------------------------------------------------------ field help (explain)

@app.command("explain")
def explain_command(
    field: str = typer.Argument(
        ..., help="A dotted config field or section, e.g. finetune.p, finetune.train, align.params.rho."),
    overrides: Optional[list[str]] = OverridesArg,
    config: Optional[list[Path]] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    quick: bool = QuickOpt,
) -> None:
    """What a config field means: its type, its value in the resolved config and its description.

    A section (e.g. finetune.train) lists its fields; <stage>.params.X is a parameter of the stage's configured
    method (e.g. alignshield explain align.params.rho align.method=vaccine); evaluate.judge_options.JUDGE.X an
    option of a judge (e.g. alignshield explain evaluate.judge_options.embedded)."""
    _guarded(lambda: sys.stdout.write(explain(field, _config(config, preset, quick, overrides))))


_METHOD_STAGES = ("align", "finetune", "repair")


def explain(field: str, cfg: RunConfig) -> str:
    """The help text of the dotted ``field`` (or section) of the resolved ``cfg``."""
    name = ".".join(p for p in field.strip().split(".") if p)
    model, value, path = _walk(name, cfg)
    info, owner = path[-1] if path else (None, None)
    if isinstance(value, BaseModel) or (value is None and _submodel(info) is not None):
        return _explain_section(name or "RunConfig: the whole config", model, value, owner, cfg)
    params_of = _params_owner(name.split(".")[:-1], cfg)
    lines = [name + (f" (a parameter of {params_of})" if params_of else ""), f"  type:    {_type_name(info)}",
             f"  default: {_show(value)}"]
    own = _field_default(info)
    if own is not _NO_DEFAULT and _show(own) != _show(value):
        lines[-1] += f"   (the field's own default: {_show(own)})"
    lines += ["", *_indent(_description(owner, name.rsplit('.', 1)[-1]) or "(no description)")]
    return "\n".join(lines) + "\n"


def _walk(name: str, cfg: RunConfig):
    """(model class or None, value, [(FieldInfo, owning class), ...]) at the end of the dotted ``name``."""
    from pydantic.fields import FieldInfo

    from alignshield.config import EvaluateConfig, StageConfig, unknown_key_hint

    model: type[BaseModel] = RunConfig
    value: object = cfg
    path: list = []
    done: list[str] = []
    for part in name.split(".") if name else []:
        where = ".".join(done)
        if isinstance(value, StageConfig) and part == "params" and len(done) == 1 and done[0] in _METHOD_STAGES:
            params_cls = _method_params(done[0], value.method)
            path.append((model.model_fields["params"], model))
            model, value = params_cls, params_cls(**value.params)
            done.append(part)
            continue
        if done == ["evaluate", "judge_options"]:  # a judge's options: its Params class
            model, value = _judge_params(part, value.get(part))
            path.append((FieldInfo.from_annotation(model), EvaluateConfig))
            done.append(part)
            continue
        if model is None or not (isinstance(value, BaseModel) or value is None):
            raise ConfigError(f"config field {where} is a {_type_name(path[-1][0])}, not a section: "
                              f"{'.'.join([*done, part])} does not exist")
        if part not in model.model_fields:
            known = sorted(model.model_fields)
            full = ".".join([*done, part])
            params_of = _params_owner(done, cfg)
            if not known:
                raise ConfigError(f"unknown config field {full}: {params_of or where} has no "
                                  + ("parameters" if params_of else "fields"))
            raise ConfigError(f"unknown config field {full}" + (f" (a parameter of {params_of})" if params_of else "")
                              + unknown_key_hint(part, known))
        info = model.model_fields[part]
        path.append((info, model))
        value = getattr(value, part) if value is not None else _field_default(info)
        model = type(value) if isinstance(value, BaseModel) else _submodel(info)
        done.append(part)
    return model, value, path


def _method_params(stage: str, method: str) -> type[BaseModel]:
    from alignshield.stages import METHOD_REGISTRIES

    return METHOD_REGISTRIES[stage].get(method).Params


def _judge_params(judge: str, options: dict | None) -> tuple[type[BaseModel], BaseModel | None]:
    """The judge's Params class and its configured options, validated (None when they do not validate,
    e.g. a required option unset: the fields' own defaults are shown)."""
    from alignshield.evaluate.judges import params_class
    from alignshield.evaluate.judges.base import validate_params

    cls = params_class(judge)
    if cls is None:
        raise ConfigError(f"judge {judge!r} declares no options class (Params)")
    try:
        return cls, validate_params(judge, cls, options)
    except ConfigError:
        return cls, None


def _params_owner(done: list[str], cfg: RunConfig) -> str | None:
    """``align method 'vaccine'`` when ``done`` is ``[align, params]``, ``judge 'keyword'`` when it is
    ``[evaluate, judge_options, keyword]``, else None."""
    if len(done) == 2 and done[0] in _METHOD_STAGES and done[1] == "params":
        return f"{done[0]} method {getattr(cfg, done[0]).method!r}"
    if len(done) == 3 and done[:2] == ["evaluate", "judge_options"]:
        return f"judge {done[2]!r}"
    return None


def _explain_section(name: str, section: type[BaseModel], value, owner, cfg: RunConfig) -> str:
    from alignshield.config import MethodParams
    from alignshield.evaluate.judges.base import JudgeParams

    params_of = _params_owner(name.split("."), cfg)
    title = f"{name} (parameters of {params_of}: {section.__name__})" if params_of else f"{name} ({section.__name__})"
    if params_of:  # the method's Params class says what they are (MethodParams itself: no parameters)
        doc = section.__doc__ if section not in (MethodParams, JudgeParams) else None
    else:
        doc = (_description(owner, name.rsplit(".", 1)[-1]) if owner is not None else None) or section.__doc__
    lines = [title, *(_indent(_clean(doc)) if doc else [])]
    if value is None and not params_of:
        lines.append(f"  default: null (unset; when set, a {section.__name__} with these fields)")
    if not section.model_fields:
        return "\n".join([*lines, "  (no parameters)" if params_of else "  (no fields)"]) + "\n"
    rows = []
    for key, sub in section.model_fields.items():
        sub_value = getattr(value, key) if value is not None else _field_default(sub)
        shown = "(section)" if isinstance(sub_value, BaseModel) or _is_params(section, key) else _show(sub_value)
        shown = shown if len(shown) <= 40 else shown[:39] + "…"  # a long list: in full with FIELD
        rows.append((key, _type_name(sub), shown, _one_line(_description(section, key))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines.append("")
    for key, kind, shown, desc in rows:
        lines.append(f"  {key:<{widths[0]}}  {kind:<{widths[1]}}  {shown:<{widths[2]}}  {desc}".rstrip())
    lines += ["", f"`alignshield explain {name + '.' if owner is not None else ''}FIELD` for one field in full."]
    return "\n".join(lines) + "\n"


def _is_params(section: type[BaseModel], key: str) -> bool:
    from alignshield.config import StageConfig

    return issubclass(section, StageConfig) and key == "params"


def _description(owner: type[BaseModel] | None, key: str) -> str | None:
    """The field's docstring; for a field a subclass redeclares without one (a changed default), its
    parent's (pydantic keeps docstrings per class)."""
    for cls in getattr(owner, "__mro__", ()):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            found = cls.model_fields.get(key)
            if found is not None and found.description:
                return _clean(found.description)
    return None


_NO_DEFAULT = object()


def _field_default(info) -> object:
    from pydantic_core import PydanticUndefined

    if info is None:
        return _NO_DEFAULT
    if info.default_factory is not None:
        return info.default_factory()
    return _NO_DEFAULT if info.default is PydanticUndefined else info.default


def _submodel(info) -> type[BaseModel] | None:
    ann = getattr(info, "annotation", None)
    return next((c for c in [ann, *getattr(ann, "__args__", ())] if isinstance(c, type) and issubclass(c, BaseModel)),
                None)


def _type_name(info) -> str:
    ann = getattr(info, "annotation", None)
    text = ann.__name__ if isinstance(ann, type) and not getattr(ann, "__args__", None) else str(ann)
    text = re.sub(r"\b(?:[A-Za-z_][\w]*\.)+([A-Za-z_]\w*)", r"\1", text.replace("typing.", ""))
    bounds = []
    for meta in getattr(info, "metadata", ()):
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sign} {getattr(meta, attr)}")
    return text + (f", {' and '.join(bounds)}" if bounds else "")


def _show(value: object) -> str:
    if value is _NO_DEFAULT:
        return "(required)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, default=str)


def _clean(text: str) -> str:
    return inspect.cleandoc(text)


def _one_line(text: str | None) -> str:
    """The first sentence of a description, on one line."""
    if not text:
        return ""
    flat = " ".join(text.split())
    first = re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s+(?=[A-Z`(])", flat, maxsplit=1)[0]
    return first if len(first) <= 100 else first[:99].rstrip() + "…"


def _indent(text: str) -> list[str]:
    return ["  " + line if line else "" for line in text.splitlines()]


# ------------------------------------------------------------------ experiments: sweep, results, report

OutputDirOpt = typer.Option(Path("runs"), "--output-dir", "-o", help="The sweep's output_dir (holds results.sqlite).")


@app.command("sweep")
def sweep_command(
    grid: str = typer.Argument(
        ..., help="A grid file, or a shipped grid: smoke, embedded-main, paper-p, stress, alpha."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides of the grid's base config."),
    config: Optional[list[Path]] = ConfigOpt,
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Replace the grid's base preset."),
    quick: bool = QuickOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and which stages are done; compute nothing."),
    keep_going: bool = typer.Option(
        False, "--keep-going", help="Report a failed run and go on with the others (exit code 1 at the end)."),
    where: Optional[list[str]] = typer.Option(
        None, "--where", "-w", help="Only the runs with this field=value, e.g. seed=1; repeatable (a field given "
        "twice matches either value). Sweeps over different slices can run at once into one output folder: "
        "shared stages are built once."),
    launcher: Optional[str] = typer.Option(
        None, "--launcher", help="Submit one job per slice with submitit instead of running here: slurm, or local "
        "(subprocesses, to try it). The output folder must be on storage every node sees."),
    slice_by: str = typer.Option("seed", "--slice-by", help="With --launcher: one job per value of this swept field."),
    slurm: Optional[list[str]] = typer.Option(
        None, "--slurm", help="With --launcher: a submitit parameter key=value, e.g. slurm_partition=gpu, "
        "gpus_per_node=1, timeout_min=600; repeatable."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="With --launcher: wait for the jobs and report them."),
) -> None:
    """Run every point of a grid (cartesian product + zipped axes); stages are shared, finished work reused."""
    from alignshield.experiments import sweep as sw

    def act() -> None:
        if quick and preset:
            raise ConfigError("--quick and --preset are exclusive (--quick is --preset quick)")
        plan = sw.load_sweep(grid, preset="quick" if quick else preset, files=config or [], overrides=overrides or [])
        if where:
            plan = sw.restrict(plan, where)
        console.print(f"sweep {plan.name}: {len(plan.runs)} runs in {plan.output_dir}"
                      + (f" (of {plan.spec()['runs']}: {' '.join(where)})" if where else "")
                      + (f" ({len(plan.duplicates)} duplicate grid points merged)" if plan.duplicates else ""))
        if dry_run:
            sw.validate(plan)
            _print_plan(plan, sw.status(plan))
            return
        if launcher:
            from alignshield.experiments import launch

            sw.validate(plan)  # every slice's errors here, before anything is submitted
            outcome = launch.submit(plan, launcher, grid=grid, preset="quick" if quick else preset, files=config or [],
                                    overrides=overrides or [], where=where or [], slice_by=slice_by,
                                    parameters=launch.parse_parameters(slurm or []), wait=wait, echo=console.print)
            if not wait:
                return
        else:
            outcome = sw.run_sweep(plan, keep_going=keep_going, echo=console.print)
        console.print(f"sweep {plan.name}: {len(outcome.computed)} computed, {len(outcome.cached)} already done, "
                      f"{len(outcome.failed)} failed, {outcome.seconds:.0f} s; results in "
                      f"{plan.output_dir / 'results.sqlite'} (alignshield results -o {plan.output_dir})")
        if outcome.failed:
            for key, err in outcome.failed:
                console.print(f"[red]failed[/] {key}: {err}")
            raise typer.Exit(1)

    _guarded(act)


@app.command("attack")
def attack_command(
    attack: str = typer.Argument(
        ..., help="An attack file, or a shipped attack: embedded (LoRA attacks), embedded-full (+ full-parameter), "
        "llama2 (GPU scale)."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="The defence, as dotted overrides of the attack's base, e.g. align.method=vaccine repair.method=antidote."),
    config: Optional[list[Path]] = ConfigOpt,
    preset: Optional[str] = PresetOpt,
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Budget: trials to finish (overrides the file's)."),
    epsilon: Optional[float] = typer.Option(
        None, "--epsilon", "-e", help="Points of fine-tune accuracy the attacker may lose (overrides the file's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the space and the defence; compute nothing."),
) -> None:
    """Search the fine-tune attacks for the worst harmful score a defence lets through (Optuna TPE),
    keeping fine-tune accuracy within epsilon of the undefended pipeline's. Resumes after an interruption."""
    from alignshield.experiments import attack as at

    def act() -> None:
        spec, source = at.load_attack(attack)
        changes = {k: v for k, v in {"trials": trials, "epsilon": epsilon}.items() if v is not None}
        if changes:
            spec = spec.replaced(**changes)
        search = at.Attack(spec, source, preset=preset, files=config or [], overrides=overrides or [])
        console.print(f"attack {spec.name}: {spec.trials} trials, epsilon {spec.epsilon:g} points of {spec.utility}, "
                      f"maximising {search.objective}; study {search.study} in {search.storage_path}")
        if dry_run:
            search.validate()
            console.print("space and defence check out; nothing computed")
            return
        result = search.run(echo=console.print)
        table = Table(show_header=True, title=f"{search.study}: {len(result.trials)} trials (reference "
                      f"{spec.utility} {result.reference_utility:g}, floor {result.floor:g})")
        for col in ["trial", *spec.space, search.objective, "95 % CI", spec.utility, "within budget"]:
            table.add_column(col)
        for t in result.trials:
            low, high = (t.metrics.get(f"ci95/{search.objective}/{e}") for e in ("low", "high"))
            table.add_row(str(t.index), *(str(t.params[k]) for k in spec.space), f"{t.objective:g}",
                          f"[{low:g}, {high:g}]" if low is not None else "", f"{t.utility:g}",
                          "yes" if t.feasible else "no")
        _wide_console().print(table)
        worst = result.worst
        console.print(f"worst case within epsilon: {search.objective} = {worst.objective:g} (trial {worst.index}: "
                      f"{at.label(worst.params)})" if worst else "no trial within the utility budget")

    _guarded(act)


def _wide_console() -> Console:
    """stdout; as wide as needed when it is a pipe or a log (rich would wrap tables at 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=240)


def _print_plan(plan, status: list[dict]) -> None:
    table = Table(show_header=True)
    for col in ["#", *plan.swept_fields, "run", "align", "finetune", "repair", "evaluate", "in db"]:
        table.add_column(col)
    for row in status:
        table.add_row(str(row["position"]), *(str(row["swept"].get(f, "")) for f in plan.swept_fields), row["key"],
                      *(row["stages"][s] for s in ("align", "finetune", "repair", "evaluate")),
                      "yes" if row["recorded"] else "no")
    _wide_console().print(table)


@app.command("results")
def results_command(
    output_dir: Path = OutputDirOpt,
    sweep: Optional[str] = typer.Option(None, "--sweep", "-s", help="Only this sweep's runs (default: every run)."),
    filters: Optional[list[str]] = typer.Option(
        None, "--where", "-w", "--filter", "-f",
        help="Only the runs with this field=value, e.g. align.method=vaccine; repeatable (a field given twice "
        "matches either value)."),
    group_by: Optional[str] = typer.Option(
        None, "--group-by", "-g", help="Comma-separated fields (default: the swept fields but seed)."),
    metric: Optional[str] = typer.Option(
        None, "--metric", "-m",
        help="Comma-separated metric names or globs (default: harmful_score/*,finetune_accuracy/*)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV (mean and std columns)."),
    compare: bool = typer.Option(
        False, "--compare", help="Also compare, pairwise over shared seeds and prompts, the harmful score of every "
        "two groups that differ in one field: A − B with a 95 % bootstrap interval and its p."),
) -> None:
    """Mean ± std over seeds per group, from <output-dir>/results.sqlite (a --sweep: its declared tables)."""
    from alignshield.experiments import report as rp
    from alignshield.experiments.store import ResultStore, StoreError

    def act() -> None:
        try:
            store = ResultStore.in_dir(output_dir, readonly=True)
            runs = rp.select(store.runs(sweep), filters or [])
        except (StoreError, rp.ReportError) as err:
            raise ConfigError(str(err)) from None
        if not runs:
            raise ConfigError("no run matches" + (f" {', '.join(filters)}" if filters else ""))
        fields = [f.strip() for f in group_by.split(",") if f.strip()] if group_by else rp.swept_fields(runs)
        metrics = rp.metric_names(runs, [m.strip() for m in metric.split(",")] if metric else None)
        groups = rp.aggregate(runs, fields, metrics)
        title = f"{len(runs)} runs: mean ± std over seeds [harmful scores: 95 % Wilson interval of the pooled answers]"
        # a sweep's own tables (``tables:`` in its grid file), as the report shows them, unless asked otherwise
        declared = [] if group_by or metric or not sweep else store.sweeps()[sweep]["spec"].get("tables") or []
        notes: list[str] = []
        shown = [(rp.declared_table(runs, spec, notes), len(spec["group_by"])) for spec in declared] or \
            [(rp.Table(None, *rp.results_table(groups, fields, metrics)), len(fields))]
        for t, labels in shown:
            table = Table(show_header=True, title=f"{t.title}: {title}" if t.title else title)
            for i, col in enumerate(t.header):
                table.add_column(col, justify="right" if i >= labels else "left")
            for row in t.rows:
                table.add_row(*row)
            _wide_console().print(table)
        for note in notes:
            console.print(note)
        if csv_path:
            rp.write_csv(csv_path, groups, fields, metrics)
            console.print(f"wrote {csv_path}")
        for metric_name in (m for m in metrics if m.startswith("harmful_score/")) if compare else ():
            header, rows = rp.comparisons(store, groups, fields, metric_name)
            table = Table(show_header=True, title=f"paired comparisons of {metric_name}")
            for col in header:
                table.add_column(col)
            for row in rows:
                table.add_row(*row)
            _wide_console().print(table if rows else f"{metric_name}: no two groups share seeds and prompts")
        store.close()

    _guarded(act)


@app.command("report")
def report_command(
    output_dir: Path = OutputDirOpt,
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for report.md, the plots and report.html (default: <output-dir>/report)."),
    sweep: Optional[list[str]] = typer.Option(
        None, "--sweep", "-s", help="Only these sweeps (repeatable; default: all)."),
    hs_metric: Optional[str] = typer.Option(
        None, "--hs", help="Harmful-score metric to plot (default: harmful_score/embedded, else harmful_score/keyword)."),
    fa_metric: Optional[str] = typer.Option(
        None, "--fa", help="Accuracy metric to plot (default: finetune_accuracy/strict)."),
    html_page: bool = typer.Option(True, "--html/--no-html", help="Also write a self-contained report.html."),
) -> None:
    """Markdown tables, the plots the data supports, and one static HTML page."""
    from alignshield.experiments import report as rp
    from alignshield.experiments.store import StoreError

    def act() -> None:
        try:
            result = rp.build_report(output_dir, out, sweeps=sweep, hs_metric=hs_metric, fa_metric=fa_metric,
                                     html_page=html_page)
        except (StoreError, rp.ReportError) as err:
            raise ConfigError(str(err)) from None
        console.print(f"report for {', '.join(result.sections) or 'no sweep'}: {result.markdown}"
                      + (f", {result.html}" if result.html else "") + f", {len(result.figures)} plot(s)")

    _guarded(act)


if __name__ == "__main__":
    app()
