"""What a training run leaves: the LoRA matrices (``adapter.safetensors``), the head
(``head.safetensors``) and ``judge.json`` (config, data counts, held-out metrics, file hashes),
checked by reloading them through the real judge."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from alignshield.evaluate.judges import embedded
from judge_training.dataset import HELDOUT_PERCENT, SPLIT_SALT, Dataset
from judge_training.evaluate import Evaluation
from judge_training.families import HELDOUT_QUOTA, Example
from judge_training.train import GRAD_CLIP, WARMUP_FRACTION, WEIGHT_DECAY, Classifier, predict


def save_weights(clf: Classifier, out: Path) -> float | None:
    """Write the adapter and the head into ``out``; returns the LoRA scaling (alpha / r)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    adapter, scaling = lora_matrices(clf.model)
    save_file(adapter, str(out / embedded.ADAPTER_FILE), metadata={"format": "alignshield-lora-v1"})
    head = clf.head
    save_file({"weight": head.weight.detach().clone().contiguous(), "bias": head.bias.detach().clone().contiguous()},
              str(out / embedded.HEAD_FILE))
    for name in (embedded.ADAPTER_FILE, embedded.HEAD_FILE):
        os.chmod(out / name, 0o644)  # safetensors writes 0600; package data must be world-readable
    return scaling


def lora_matrices(model) -> tuple[dict, float | None]:
    """The LoRA matrices keyed by the base model's module names, and their scaling."""
    adapter, scaling = {}, None
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            base_name = name.removeprefix("base_model.model.")
            adapter[f"{base_name}.lora_A"] = module.lora_A["default"].weight.detach().clone().contiguous()
            adapter[f"{base_name}.lora_B"] = module.lora_B["default"].weight.detach().clone().contiguous()
            scaling = float(module.scaling["default"])
    return adapter, scaling


def training_record(args: argparse.Namespace, cfg: dict, scaling: float | None, ds: Dataset, ev: Evaluation,
                    steps: int, train_seconds: float) -> dict:
    """judge.json as first written, before the reload check adds the file hashes."""
    return {
        "judge": embedded.JUDGE_NAME,
        "format": 1,
        "model": dict(cfg, lora_scaling=scaling, threshold=ev.threshold),
        "encoder_package": {"name": embedded.ENCODER_DIST, "version": package_version(embedded.ENCODER_DIST)},
        "training": training_section(args, steps, train_seconds),
        "data": {
            "data_dir": "alignshield/resources/data", "split": f"sha256('{SPLIT_SALT}:'+normalized prompt) "
            f"% 100 < {HELDOUT_PERCENT} -> held-out", "train_quota": args.train_quota,
            "heldout_quota": HELDOUT_QUOTA, **ds.stats,
        },
        "heldout_metrics": rounded(ev.metrics),
        "gold_validation_metrics": rounded(ev.gold_metrics),
        "heldout_family_flag_rate": flag_rates(ev.rates),
        "heldout_family_flag_rate_classifier_alone": flag_rates(ev.rates_model),
        "command": "python tools/train_judge.py " + " ".join(sys.argv[1:]),
    }


def training_section(args: argparse.Namespace, steps: int, train_seconds: float) -> dict:
    import peft
    import torch
    import transformers

    return {
        "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "head_lr": args.head_lr, "weight_decay": WEIGHT_DECAY, "warmup_fraction": WARMUP_FRACTION,
        "schedule": "linear", "optimizer": "AdamW", "loss": "BCEWithLogits", "family_loss_weight": args.loss_weights,
        "gold_positive_weight": args.gold_positive_weight,
        "grad_clip": GRAD_CLIP, "threads": args.threads, "steps": steps, "train_seconds": round(train_seconds, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def rounded(metrics: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def flag_rates(rates: dict) -> dict:
    return {k: round(v["flag_rate"], 4) for k, v in rates.items()}


def package_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def write_record(out: Path, record: dict) -> None:
    (out / embedded.CONFIG_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def check_reload(out: Path, threshold: float, clf: Classifier, heldout: Sequence[Example]) -> float:
    """Reload the saved judge and score a slice of the held-out split with it: it must reproduce the
    in-memory classifier (rules included). Returns the largest difference."""
    judge = embedded.EmbeddedJudge(weights=out, threshold=threshold)
    probe = heldout[:: max(1, len(heldout) // 64)]
    reloaded = judge.scores([e.prompt for e in probe], [e.answer for e in probe])
    expected = [0.0 if embedded.never_flagged(e.prompt, e.answer) else s for e, s in zip(probe, predict(clf, probe))]
    drift = max(abs(a - b) for a, b in zip(reloaded, expected))
    if drift > 1e-3:
        raise RuntimeError(f"the saved judge does not reproduce the trained model (max |diff| {drift:.2e})")
    return drift


def finish_record(out: Path, record: dict, drift: float, t_start: float) -> None:
    """Add the file hashes, the reload check and the total time to judge.json and rewrite it."""
    record["files"] = {f: file_record(out / f) for f in (embedded.ADAPTER_FILE, embedded.HEAD_FILE)}
    record["reload_max_abs_diff"] = float(f"{drift:.2e}")
    record["total_seconds"] = round(time.time() - t_start, 1)
    write_record(out, record)


def file_record(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
