"""The classifier (all-MiniLM-L6-v2 with LoRA on its top layers, a linear head on the pooled pair)
and its training: the batch plan, the optimizer and schedule, the loop. torch and peft are imported
only here, inside the functions, so building the data needs neither."""

from __future__ import annotations

import argparse
import importlib
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from alignshield.evaluate.judges import embedded
from judge_training.families import FAMILY_LOSS_WEIGHT, GOLD_FAMILIES, Example, family_rng

MODEL_CONFIG = {
    "encoder": "sentence-transformers/all-MiniLM-L6-v2",
    "max_length": 256,
    "pooling": "answer",
    "head": "linear",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_layers": [2, 3, 4, 5],
    "lora_targets": ["query", "key", "value", "dense"],
}
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.06  # of the steps, then a linear decay to 0
GRAD_CLIP = 1.0
TRAINING_PACKAGES = ("peft", "torch", "transformers", "safetensors.torch")


def import_training_packages() -> None:
    """Fail before any work when a package the training needs is missing (the judge needs no peft)."""
    for name in TRAINING_PACKAGES:
        importlib.import_module(name)


def seed_everything(seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


@dataclass
class Classifier:
    """The encoder with its LoRA adapter (peft), the linear head, and how pairs are fed to them."""

    tokenizer: Any
    model: Any
    head: Any
    max_length: int
    pooling: str

    def logits(self, examples: Sequence[Example]):
        enc = embedded.tokenize_pairs(self.tokenizer, [e.prompt for e in examples],
                                      [e.answer for e in examples], self.max_length)
        return self.head(embedded.pool(self.model(**enc).last_hidden_state, enc, self.pooling)).squeeze(-1)

    def lora_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_classifier(cfg: dict) -> Classifier:
    """The encoder with fresh LoRA matrices, then a fresh head: in this order (torch's seeded draws)."""
    import torch
    from peft import LoraConfig, get_peft_model

    tokenizer, base = embedded.load_encoder(embedded.encoder_dir())
    model = get_peft_model(base, LoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
        target_modules=cfg["lora_targets"], layers_to_transform=cfg["lora_layers"], bias="none",
    ))
    width = base.config.hidden_size * (2 if cfg["pooling"] == "mean+answer" else 1)
    head = torch.nn.Linear(width, 1)
    return Classifier(tokenizer, model, head, cfg["max_length"], cfg["pooling"])


def batches_by_length(n_items: int, lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort inside windows of 16 batches by length (less padding), shuffle the batches."""
    idx = list(range(n_items))
    rng.shuffle(idx)
    out = []
    window = batch_size * 16
    for start in range(0, n_items, window):
        chunk = sorted(idx[start : start + window], key=lambda i: lengths[i])
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def batch_plan(clf: Classifier, examples: Sequence[Example], args: argparse.Namespace) -> list[list[int]]:
    """Every step's example indices, for all epochs: length-sorted batches (``batches_by_length``)."""
    lengths = [len(clf.tokenizer(e.prompt, e.answer, truncation="longest_first",
                                 max_length=args.max_length)["input_ids"]) for e in examples]
    rng = family_rng(args.seed, "batches")
    return [b for _ in range(args.epochs) for b in batches_by_length(len(examples), lengths, args.batch_size, rng)]


def optimizer_and_schedule(clf: Classifier, args: argparse.Namespace, n_steps: int):
    """AdamW (LoRA and head at their own learning rates); linear warm-up, then linear decay to 0."""
    import torch

    opt = torch.optim.AdamW([
        {"params": clf.lora_params(), "lr": args.lr},
        {"params": clf.head.parameters(), "lr": args.head_lr},
    ], weight_decay=WEIGHT_DECAY)
    warmup = max(1, int(WARMUP_FRACTION * n_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (n_steps - s) / max(1, n_steps - warmup))))
    return opt, sched


def fit(clf: Classifier, examples: Sequence[Example], args: argparse.Namespace) -> tuple[int, float]:
    """Train the LoRA matrices and the head on ``examples``; returns (steps, seconds)."""
    import torch

    plan = batch_plan(clf, examples, args)
    opt, sched = optimizer_and_schedule(clf, args, len(plan))
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    params = clf.lora_params() + list(clf.head.parameters())
    print(f"training: {len(plan)} steps, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{sum(p.numel() for p in clf.lora_params())} LoRA + {sum(p.numel() for p in clf.head.parameters())} "
          "head parameters", flush=True)
    t_train = time.time()
    clf.model.train()
    clf.head.train()
    running = []
    for step, idx in enumerate(plan, 1):
        running.append(train_step(clf, [examples[i] for i in idx], loss_fn, params, opt, sched, args.loss_weights,
                                   args.gold_positive_weight))
        if step % 50 == 0 or step == len(plan):
            print(f"  step {step:4d}/{len(plan)}  loss {sum(running) / len(running):.4f}  "
                  f"{time.time() - t_train:6.1f}s", flush=True)
            running = []
    return len(plan), time.time() - t_train


def example_weight(e: Example, loss_weights: dict[str, float], gold_positive_weight: float = 1.0) -> float:
    """The loss weight of one pair: its family's, times ``gold_positive_weight`` for a harmful gold
    answer (the pipeline's own harmful answers are ~7 % of the gold set; this rebalances them)."""
    boost = gold_positive_weight if e.family in GOLD_FAMILIES and e.label == 1 else 1.0
    return loss_weights.get(e.family, 1.0) * boost


def train_step(clf: Classifier, exs: Sequence[Example], loss_fn, params: list, opt, sched,
               loss_weights: dict[str, float] = FAMILY_LOSS_WEIGHT, gold_positive_weight: float = 1.0) -> float:
    """One optimizer step on one batch, each pair's loss weighted by ``example_weight``."""
    import torch

    logits = clf.logits(exs)
    weights = torch.tensor([example_weight(e, loss_weights, gold_positive_weight) for e in exs])
    loss = (loss_fn(logits, torch.tensor([float(e.label) for e in exs])) * weights).sum() / weights.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def predict(clf: Classifier, examples: Sequence[Example], batch_size: int = 64) -> list[float]:
    """The classifier's harmful probability per pair (no rules), batched by length."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].answer))
    scores = [0.0] * len(examples)
    clf.model.eval()
    clf.head.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            logits = clf.logits([examples[i] for i in idx])
            for i, p in zip(idx, torch.sigmoid(logits).tolist()):
                scores[i] = p
    return scores
