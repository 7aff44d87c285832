"""Command line: a thin shell over ``alignshield.stages``. Config = preset + YAML files + a.b=c overrides."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
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
    from alignshield.registry import UnknownNameError

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_rich_handler()])
    try:
        action()
    except (ConfigError, DataError, UnknownNameError, JudgeLoadError, LayerDiscoveryError) as err:
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
    table = Table(title="alignshield results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value}")
    Console().print(table)
    Console().print(f"[dim]{_settings_line(cfg)}[/]")


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
) -> None:
    """Print the resolved config (every default spelled out) as YAML."""
    _guarded(lambda: sys.stdout.write(dump_yaml(_config(config, preset, quick, overrides))))


@app.command("list")
def list_names() -> None:
    """Methods per stage, tasks, datasets, judges and presets."""
    from alignshield.align import ALIGN_METHODS
    from alignshield.config import PRESETS_DIR
    from alignshield.data.pools import DATASETS
    from alignshield.evaluate.judges import JUDGES
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
    ]:
        table.add_row(kind, ", ".join(names))
    Console().print(table)


if __name__ == "__main__":
    app()
