"""Antidote: one-shot post-fine-tuning repair by pruning harmful weights (Huang et al., arXiv 2408.09600).

After the user's fine-tune, run harmful calibration examples (prompt + harmful answer) through the
model, score every weight of the fine-tune adapter with the Wanda importance

    S_ij = |W_ij| * ||X_j||,   ||X_j|| = sqrt(mean over calibration tokens of x_j^2)

where x is the input of that very linear map, and zero the k highest-scoring entries of every
output row: the weights that matter most for producing harmful answers. By default, as in the
reference (git-disl/Antidote ``utils.py:prune_wanda_outlier``), every LoRA module of the adapter is
pruned (``targets=adapter``) and k = in - int(in * (1 - alpha)) (``rounding=reference``); the former
defaults are ``targets=qkv`` and ``rounding=floor`` (k = floor(alpha * in)); see ``prune.py``.

``score=factors`` (the reference): ``lora_A`` (r x in) is scored with the layer input, ``lora_B``
(out x r) with the output of ``lora_A``; both are pruned in place and the adapter keeps its shape.

``score=merged``: the update dW = scale * B @ A (out x in) is scored with the layer input and pruned
per row. A pruned dW is no longer rank r; a rank-r SVD would put weight back on the zeroed entries
(the very weights Antidote removes), so the pruned dW is stored EXACTLY, as a LoRA of rank
min(out, in) with one factor the identity and scale 1 (PEFT ``rank_pattern``/``alpha_pattern``
record the per-module rank, so the saved adapter loads and merges like any other). Exact up to
float32 rounding of dW, at the cost of a dense-sized adapter for those modules.

Statistics: forward hooks, eval mode (LoRA dropout off), ``torch.no_grad``, batches sorted by length,
padding excluded by the attention mask, sums of squares and token counts in float64. The mean over
tokens differs from Wanda's per-sample average of ||X_j||^2 only by one constant factor per layer,
so the masks are the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from alignshield.data.collate import PadCollator, Tokenized
from alignshield.models.layers import unwrapped
from alignshield.models.lora import LoraTarget, check_mergeable, lora_delta, store_dense_delta
from alignshield.repair import REPAIR_METHODS
from alignshield.repair.prune import (
    PruneParams,
    matrix_entry,
    per_row_k,
    prune_factors,
    select_targets,
    summary,
    zero_top_k_per_row,
)

log = logging.getLogger(__name__)


class AntidoteParams(PruneParams):
    """Antidote's settings. Paper/reference defaults: alpha (``dense_ratio``) = 0.1, 2000 harmful
    calibration samples (``bad_sample_num=2000``), every LoRA module of the fine-tune adapter pruned
    (``targets=adapter``) with the reference's per-row count (``rounding=reference``), LoRA A and B
    scored apart (git-disl/Antidote ``script/finetune/antidote_poison_ratio.sh``,
    ``utils.py:prune_wanda_outlier``).
    """

    n_calibration: int = Field(2000, gt=0)
    """Harmful calibration examples used: the first n of ``repair.calibration`` (clipped to its size;
    the report gives the number used). Paper: 2000 (the reference's off-by-one slicing used 1999)."""
    batch_size: int = Field(8, gt=0)
    """Calibration examples per forward pass. Not a paper setting (the reference used 1, without an
    attention mask); padding is excluded, so it changes speed and memory, not the statistics."""
    score: Literal["factors", "merged"] = "factors"
    """``factors`` (reference): prune LoRA A and B separately, each scored with its own input.
    ``merged``: prune the update scale * B @ A, scored with the layer input, stored exactly as a
    dense-rank LoRA (min(out, in)) for the pruned modules."""


# ----------------------------------------------------------------------------- activation statistics


@dataclass
class InputStats:
    """Sum over non-padding tokens of x_j^2 (float64) and the number of those tokens."""

    sum_sq: torch.Tensor
    tokens: int = 0

    def mean_sq(self) -> torch.Tensor:
        return self.sum_sq / self.tokens


def calibration_batches(examples: list[Tokenized], batch_size: int, pad_token_id: int) -> Iterator[dict]:
    """Right-padded batches of similar lengths (sorted, stable): little compute spent on padding."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    collate = PadCollator(pad_token_id)
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]])
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _runner(model: nn.Module, hooked: Iterable[nn.Module]) -> nn.Module:
    """The transformer trunk when it holds every hooked module (skips the LM head: a vocabulary-sized
    matmul per token, about a fifth of SmolLM2's forward), else the whole model."""
    base = unwrapped(model)
    trunk = getattr(base, "base_model", None)
    if isinstance(trunk, nn.Module) and trunk is not base:
        inside = {id(m) for m in trunk.modules()}
        if all(id(m) in inside for m in hooked):
            return trunk
    return model


def hooked_forward(model: nn.Module, modules: dict[Any, nn.Module], batches: Iterable[dict],
                   on_input: Callable[[Any, torch.Tensor, torch.Tensor], None]) -> tuple[int, int]:
    """Run ``batches`` (``input_ids``, ``attention_mask`` with 1 = real token) through ``model`` in eval
    mode without gradients, calling ``on_input(key, x, keep)`` from a forward hook on each module: ``x`` its
    input, ``keep`` the batch's flattened mask (which of ``x``'s token rows are real). Hooks are removed and
    the training mode restored whatever happens. Returns (examples, real tokens) seen."""

    def make_hook(key):
        def hook(module, args, output):
            if not args:
                raise RuntimeError(f"{key}: forward hook got no positional input")
            on_input(key, args[0], keep)
        return hook

    runner = _runner(model, modules.values())
    device = next(model.parameters()).device
    was_training = model.training
    handles = [m.register_forward_hook(make_hook(key)) for key, m in modules.items()]
    examples = tokens = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"]
                keep = mask.reshape(-1).bool()
                examples, tokens = examples + mask.shape[0], tokens + int(mask.sum())
                runner(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return examples, tokens


def collect_input_stats(model: nn.Module, modules: dict[Any, nn.Module],
                        batches: Iterable[dict]) -> dict[Any, InputStats]:
    """Per module, the float64 sum of squares of its input features over the non-padding tokens.

    ``batches`` yield ``input_ids`` and ``attention_mask`` (1 = real token). Every module must run in
    every forward pass; one that never sees a token is an error naming it.
    """
    stats = {key: InputStats(torch.zeros(m.in_features, dtype=torch.float64)) for key, m in modules.items()}

    def on_input(key, x: torch.Tensor, keep: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != keep.numel():
            raise RuntimeError(f"{key}: input has {flat.shape[0]} token rows, the batch has {keep.numel()} "
                               "positions; cannot align it with the attention mask")
        real = flat[keep.to(flat.device)].double()
        stats[key].sum_sq += real.pow(2).sum(0).cpu()
        stats[key].tokens += real.shape[0]

    _, total = hooked_forward(model, modules, batches, on_input)
    missing = [str(k) for k, s in stats.items() if s.tokens != total]
    if total == 0:
        raise ValueError("the calibration batches hold no tokens")
    if missing:
        raise RuntimeError(f"these modules did not see every calibration token (adapter disabled or merged?): "
                           f"{', '.join(missing[:5])}")
    return stats


# ----------------------------------------------------------------------------- scores


def wanda_score(weight: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(mean x_j^2), in float64; ``mean_sq`` is indexed by the input feature j."""
    return weight.detach().double().abs() * mean_sq.to(weight.device).sqrt().unsqueeze(0)


def antidote_scores(model: nn.Module, targets: list[LoraTarget], calibration: list[Tokenized], score: str,
                    batch_size: int, pad_token_id: int) -> tuple[dict[tuple[str, str], torch.Tensor], int]:
    """Wanda scores keyed (module name, ``lora_A`` | ``lora_B`` | ``delta``), and the token count."""
    hooked: dict[tuple[str, str], nn.Module] = {(t.name, "lora_A"): t.factor("lora_A") for t in targets}
    if score == "factors":
        hooked |= {(t.name, "lora_B"): t.factor("lora_B") for t in targets}
    stats = collect_input_stats(model, hooked, calibration_batches(calibration, batch_size, pad_token_id))
    tokens = next(iter(stats.values())).tokens
    scores = {}
    for t in targets:
        if score == "factors":
            for which in ("lora_A", "lora_B"):
                scores[(t.name, which)] = wanda_score(t.factor(which).weight, stats[(t.name, which)].mean_sq())
        else:  # the input of lora_A is the layer input (dropout is off in eval mode)
            scores[(t.name, "delta")] = wanda_score(lora_delta(t), stats[(t.name, "lora_A")].mean_sq())
    return scores, tokens


# ----------------------------------------------------------------------------- merged mode storage


def prune_merged(model: nn.Module, targets: list[LoraTarget], alpha: float,
                 scores: dict[tuple[str, str], torch.Tensor], rounding: str) -> dict[str, Any]:
    modules, zeroed, total, k_zero = {}, 0, 0, 0
    for t in targets:
        rank_before = int(t.module.r[t.adapter])
        delta = lora_delta(t)
        k = per_row_k(alpha, delta.shape[1], rounding)
        mask = zero_top_k_per_row(delta, scores[(t.name, "delta")], k, rounding)
        entry = matrix_entry(delta, mask, k)
        rank = store_dense_delta(model, t, delta)
        modules[t.name] = {"delta": entry, "rank_before": rank_before, "stored_rank": rank}
        zeroed += entry["zeroed"]
        total += delta.numel()
        k_zero += k == 0
    return summary(modules, zeroed, total, k_zero, rounding)


# ----------------------------------------------------------------------------- the method


@REPAIR_METHODS.register("antidote")
class Antidote:
    """Zero the fine-tune adapter weights most important (Wanda score) on harmful calibration data."""

    Params = AntidoteParams
    edits = True

    def repair(self, model: nn.Module, calibration: list[Tokenized], params: AntidoteParams, *, seed: int,
               pad_token_id: int) -> dict[str, Any]:
        if not calibration:
            raise ValueError("antidote: the calibration set is empty; repair.calibration must select harmful "
                             "prompt/answer pairs (default: beavertails_unsafe rows [2200, 4200))")
        targets, selection = select_targets(model, params)
        if params.score == "merged":
            check_mergeable(targets)
        used = calibration[: min(params.n_calibration, len(calibration))]
        if len(used) < params.n_calibration:
            log.info("antidote: n_calibration=%d but the pool has %d examples; using %d",
                     params.n_calibration, len(calibration), len(used))
        scores, tokens = antidote_scores(model, targets, used, params.score, params.batch_size, pad_token_id)
        if params.score == "factors":
            report = prune_factors(targets, params.alpha, lambda t, which, w: scores[(t.name, which)],
                                   params.rounding)
        else:
            report = prune_merged(model, targets, params.alpha, scores, params.rounding)
        log.info("antidote: zeroed %d of %d weights in %d modules (targets=%s, rounding=%s, alpha=%s, "
                 "%d calibration examples, %d tokens)", report["total_zeroed"], report["total_weights"],
                 len(targets), selection["targets"], params.rounding, params.alpha, len(used), tokens)
        return {"method": "antidote", "alpha": params.alpha, "score": params.score, "n_calibration": len(used),
                "n_calibration_requested": params.n_calibration, "calibration_tokens": tokens,
                **selection, **report}
