"""Experiment trackers, through accelerate: TensorBoard, Weights & Biases (offline or online), MLflow,
Comet, Aim, ClearML, DVCLive, trackio, whatever ``accelerate`` supports (``tracking.backends``).

They mirror what the stage folders record, for people who browse runs in a tracker; the stage folders
and ``results.sqlite`` stay the source of truth. Training stages log, per optimizer step, ``loss``,
``lr``, ``step_seconds`` and the method's own signals (``Trainer.signals``: Vaccine's perturbation
norm, T-Vaccine's active layers, ...); the repair stage logs its report (Antidote's edit fraction);
the evaluation logs its metrics. Each stage is one tracker run named ``<stage>/<method>-<key>``
(its folder's name), under ``tracking.dir`` (default ``<output_dir>/tracking``). Tracking never
changes a stage's key or result. Only the main process logs (accelerate's rule).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Tracking:
    backends: list[str]
    project_dir: Path
    run_name: str
    config: dict[str, Any]

    def accelerator_kwargs(self) -> dict[str, Any]:
        return {"log_with": self.backends, "project_dir": str(self.project_dir)}

    def start(self, accelerator) -> None:
        # TensorBoard writes to <project_dir>/<run name>; the others take the name as project/experiment
        accelerator.init_trackers(self.run_name, config=_flat(self.config))


def for_stage(cfg, stage: str, out: Path) -> Tracking | None:
    """The tracker run of one stage folder, or None when ``tracking.backends`` is empty."""
    if not cfg.tracking.backends:
        return None
    root = Path(cfg.tracking.dir) if cfg.tracking.dir else Path(cfg.output_dir) / "tracking"
    return Tracking(list(cfg.tracking.backends), root, f"{stage}/{out.name}", cfg.model_dump(mode="json"))


@contextmanager
def logger(tracking: Tracking | None) -> Iterator[Any]:
    """``log(values, step=None)`` into the stage's trackers (a no-op without any), closed at exit."""
    if tracking is None:
        yield lambda values, step=None: None
        return
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **tracking.accelerator_kwargs())
    tracking.start(accelerator)
    try:
        yield lambda values, step=None: accelerator.log(scalars(values), step=step)
    finally:
        accelerator.end_training()


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers (and text) only, nested mappings flattened to ``a/b`` keys: what trackers accept."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= scalars(value, name + "/")
        elif isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, (int, float, str)):
            out[name] = value
    return out


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as trackers take them: flat keys, scalar values (lists as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in _flat(value).items()}
        else:
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
