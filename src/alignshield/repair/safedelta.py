"""Safe Delta: keep the part of the fine-tune's update that costs little safety, and compensate
(Lu et al., ICML 2025, arXiv 2505.12038; ColinLu50/SafeDelta).

For every linear layer the fine-tune changed (here: every LoRA module of the fine-tune adapter), with
W the aligned weight, W' = W + dW the fine-tuned one and X the layer's inputs on *safety* data (harmful
prompts with safe answers) run through the aligned model:

    H = 2 X X^T / N + lambda I,   lambda = 0.01 * mean(diag H),   U = chol(H^-1), upper,   d_m = U_mm

The safety cost of taking the fine-tuned value at (i, m) is the OBS loss (W'_im - W_im)^2 / d_m^2.
Within a block of ``blocksize`` columns, elements are taken in ascending order of their column's
1 / d_m^2 (the most safety-sensitive columns last; the top ``exclude_fraction`` never), as long as
the running sum of their losses stays within the budget

    eps = mean over the block of 1 / d_m^2  *  (scale / 2)  *  rows / 4096.

Then, column by column (``sub_block`` columns at a time), a taken element becomes W'_im and the others
keep the current value, and the change is compensated on the columns to its right by the OBS update
W[:, later] -= ((w - q) / d) U[cols, later] (SparseGPT's, arXiv 2301.00774): the output on the safety
data moves as little as possible. Result: W_new, stored back into the adapter exactly (dW_new = W_new -
W as a dense-rank LoRA, as Antidote's ``score=merged``). No training.

Reference: ColinLu50/SafeDelta at ``3a4ea35``: ``llama2/safedelta/safedelta_runner.py`` (``SafeDeltaRunner``:
``add_batch`` the H, ``adjust_delta`` the selection and compensation, blocksize 2048, sub-block 4, 15 %
excluded, ``scale = rows / 4096``, ``s / 2``), ``llama2/run_safedelta.py`` (128 safety samples,
``percdamp=0.01``, every nn.Linear of every decoder layer, inputs from the aligned model), and
``llama2/scripts/purebad_safedelta.sh`` (``--scale 0.11``; ``dirtysummary_safedelta.sh``: 0.1).
Deviations, named:

* The reference repairs a full-parameter fine-tune; ours the fine-tune LoRA (#2): W' = W + scale B A,
  and linears without LoRA are left alone (their dW is 0, where the reference's result is W too).
* Safety data: the alignment's own safety pairs (``align.data.safety``, a seeded draw of
  ``n_safety``), where the reference uses answers its aligned model generated (``other_self_gen.json``)
  under four system prompts. Padding is masked out of H; the reference runs one unpadded sample at a time.
* The budget keeps the reference's constants, which are Llama-2-7B's (4096 rows, two 2048-column
  blocks per 4096 columns): on a narrower model the same ``scale`` admits a different share of dW.
* Ties in 1 / d_m^2 (every row of a column shares it) are taken in row order (a stable sort); the
  reference's ``torch.argsort`` on CUDA leaves their order unspecified. For a block of fewer than 7
  weights the reference's ``[0:-int(0.15 n)]`` slice is empty (nothing taken); ours keeps them.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from pydantic import Field
from torch import nn

from alignshield.config import MethodParams
from alignshield.data.collate import Tokenized
from alignshield.models.lora import check_mergeable, find_targets, lora_delta, store_dense_delta
from alignshield.repair import REPAIR_METHODS
from alignshield.repair.antidote import calibration_batches, hooked_forward

log = logging.getLogger(__name__)
REFERENCE_ROWS, REFERENCE_BLOCKS_PER_4096 = 4096, 2  # the budget's Llama-2-7B constants (safedelta_runner.py)


class SafeDeltaParams(MethodParams):
    """Safe Delta's settings; the defaults are the reference's (``purebad_safedelta.sh``, ``run_safedelta.py``,
    ``safedelta_runner.py``)."""

    scale: float = Field(0.11, ge=0)
    """s, the safety-degradation budget (``--scale``): larger keeps more of the fine-tune's update."""
    n_safety: int = Field(128, gt=0)
    """Safety examples that estimate H (clipped to the pool; the report gives the number used)."""
    exclude_fraction: float = Field(0.15, ge=0, lt=1)
    """Share of each block's weights, the most safety-sensitive columns, that never take the update."""
    percdamp: float = Field(0.01, ge=0)
    """Dampening of H: this fraction of its mean diagonal is added to the diagonal."""
    blocksize: int = Field(2048, gt=0)
    sub_block: int = Field(4, gt=0)
    """Columns updated together; the compensation of one reaches the columns after its sub-block."""
    batch_size: int = Field(8, gt=0)
    """Safety examples per forward pass (padding is masked: speed and memory only)."""
    target_modules: list[str] | None = None
    """Substrings of module names to repair; None = every LoRA module of the fine-tune adapter."""


def upper_inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U with U^T U = (H + lambda I)^-1, U upper; dead inputs (zero diagonal) get a 1 there first."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def block_mask(w: torch.Tensor, w_ft: torch.Tensor, d: torch.Tensor, scale: float, rows: int,
               exclude_fraction: float) -> torch.Tensor:
    """Which elements of one block take the fine-tuned value (see the module docstring)."""
    cost = (1 / d ** 2).reshape(1, -1).expand_as(w)
    loss = ((w_ft - w) ** 2 / d.reshape(1, -1) ** 2).flatten()
    order = torch.argsort(cost.flatten(), stable=True)
    order = order[: order.numel() - int(exclude_fraction * order.numel())]
    budget = cost.mean() * (scale / REFERENCE_BLOCKS_PER_4096) * (rows / REFERENCE_ROWS)
    taken = torch.zeros_like(loss, dtype=torch.bool)
    taken[order] = torch.cumsum(loss[order], 0) <= budget
    return taken.reshape(w.shape)


def safe_delta(w_aligned: torch.Tensor, w_ft: torch.Tensor, h: torch.Tensor, params: SafeDeltaParams,
               masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_new, taken) for one linear: W_aligned and W_ft are out x in, H is in x in. ``masks``, one
    per block, replaces the selection (for tests of the compensation)."""
    dtype = torch.promote_types(w_aligned.dtype, torch.float32)
    w, w_ft = w_aligned.to(dtype).clone(), w_ft.to(dtype)
    rows, cols = w.shape
    u = upper_inverse_cholesky(h.to(dtype), params.percdamp)
    taken_all = torch.zeros_like(w, dtype=torch.bool)
    for b, i1 in enumerate(range(0, cols, params.blocksize)):
        i2 = min(i1 + params.blocksize, cols)
        w1, w2, u1 = w[:, i1:i2].clone(), w_ft[:, i1:i2], u[i1:i2, i1:i2]
        d = torch.diag(u1)
        mask = (block_mask(w1, w2, d, params.scale, rows, params.exclude_fraction) if masks is None
                else masks[b])
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        for j1 in range(0, i2 - i1, params.sub_block):
            j2 = min(j1 + params.sub_block, i2 - i1)
            cur = w1[:, j1:j2]
            q = torch.where(mask[:, j1:j2], w2[:, j1:j2], cur)
            err = (cur - q) / d[j1:j2].unsqueeze(0)
            q1[:, j1:j2] = q
            w1[:, j2:] -= err @ u1[j1:j2, j2:]
            err1[:, j1:j2] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        taken_all[:, i1:i2] = mask
    return w, taken_all


def input_gram(model: nn.Module, modules: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """Per module, 2 X X^T / N over the non-padding tokens of its input, N = examples: each batch's
    product in float32 (as the reference), summed in float64. Modules that read the same tensor (q, k,
    v; gate, up) share one product."""
    grams = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in modules.items()}
    last: list = [None, None]  # (the input tensor, its product): the next module reading it reuses it

    def on_input(key, x: torch.Tensor, keep: torch.Tensor) -> None:
        if last[0] is not x:
            flat = x.reshape(-1, x.shape[-1])[keep.to(x.device)].float()
            last[:] = [x, (flat.T @ flat).double().cpu()]
        grams[key] += last[1]

    try:
        with model.disable_adapter():  # the ALIGNED model's inputs (the reference's)
            examples, _ = hooked_forward(model, modules, batches, on_input)
    finally:
        last.clear()
    return {k: 2 * g / examples for k, g in grams.items()}


@REPAIR_METHODS.register("safedelta")
class SafeDelta:
    """Keep the fine-tune update where it costs little safety (OBS loss on safety data), compensate."""

    Params = SafeDeltaParams
    edits = True
    uses_safety_data = True
    """The repair stage passes ``safety``: the alignment's safety pairs, tokenized."""
    reads_aligned_base = True
    """The weights under the fine-tune adapter must be the aligned model's (not ``single-lora``)."""

    def repair(self, model: nn.Module, calibration: list[Tokenized], params: SafeDeltaParams, *, seed: int,
               pad_token_id: int, safety: list[Tokenized] | None = None) -> dict[str, Any]:
        if not safety:
            raise ValueError("safedelta: no safety examples; align.data.safety must select harmful prompts with "
                             "safe answers")
        targets, _ = find_targets(model, params.target_modules)
        check_mergeable(targets)
        used = random.Random(seed).sample(safety, min(params.n_safety, len(safety)))
        grams = input_gram(model, {t.name: t.module.base_layer for t in targets},
                           calibration_batches(used, params.batch_size, pad_token_id))
        modules, kept, total = {}, 0, 0
        with torch.no_grad():
            for t in targets:
                w = t.module.base_layer.weight.detach().double()
                delta = lora_delta(t)
                w_new, taken = safe_delta(w, w + delta, grams[t.name], params)
                store_dense_delta(model, t, w_new - w)
                share = float(taken.double().mean())
                modules[t.name] = {"taken": round(share, 6),
                                   "update_norm_ratio": round(float(torch.linalg.norm(w_new - w)
                                                                    / torch.linalg.norm(delta).clamp_min(1e-30)), 6)}
                kept += int(taken.sum())
                total += taken.numel()
        log.info("safedelta: took the fine-tuned value for %d of %d weights in %d modules (scale %s, %d safety "
                 "examples)", kept, total, len(targets), params.scale, len(used))
        return {"method": "safedelta", "scale": params.scale, "n_safety": len(used), "n_modules": len(targets),
                "taken": kept, "total_weights": total, "taken_fraction": round(kept / max(total, 1), 6),
                "modules": modules}
