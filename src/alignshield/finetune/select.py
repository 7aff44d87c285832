"""Benign-data selection attacks: which task examples the attacker fine-tunes on.

Benign-only fine-tuning already erodes alignment; an attacker who *chooses* the benign examples
erodes it more. ``finetune.select`` picks the n - round(p n) task examples of the mix from
``candidates`` task examples (a seeded draw from the train split), scored on the aligned model (the
model the fine-tune starts from) by the gradient g(z) of the example's answer loss:

``self-inf-n`` (Guan et al., "Benign Samples Matter! Fine-tuning On Outlier Benign Samples Severely
Breaks Safety", arXiv 2505.06843): the highest

    Score(z) = log(||g(z)||^2 + 1) + log(len(a) + 1)

with len(a) the answer's token count (the length term undoes self-influence's pull towards short
answers). Needs no harmful data at all: the stealthy attack.

``harmful-gradient`` (He et al., "What is in Your Safe Data? Identifying Benign Data that Breaks
Safety", arXiv 2404.01099, the gradient-similarity variant): the highest cosine between g(z) and the
mean gradient of ``anchors`` harmful pairs (a seeded draw from ``finetune.harmful``).

Deviation, for cost (named): gradients are those of the weights of the last ``layers`` decoder
layers only (the papers use every weight, or LoRA gradients), so scoring costs a forward and a short
backward per candidate: 0.31 s each for the embedded model in bfloat16 on a 2-core AMD EPYC that was
also running two sweeps (100 candidates in 31 s, ``alignshield run --quick finetune.select.method=self-inf-n
finetune.select.candidates=100``).
"""

from __future__ import annotations

import math
import random
import torch

from alignshield.config import BenignSelection
from alignshield.data.collate import IGNORE_INDEX, PadCollator, Tokenized
from alignshield.seeding import derive_seed

def candidate_indices(pool_size: int, settings: BenignSelection, seed: int) -> list[int]:
    """Which rows of the task pool are scored: a seeded draw of ``candidates`` (sorted), or all."""
    if settings.candidates >= pool_size:
        return list(range(pool_size))
    rng = random.Random(derive_seed(seed, "benign-selection-candidates"))
    return sorted(rng.sample(range(pool_size), settings.candidates))


def example_gradient(model: torch.nn.Module, example: Tokenized, params: list[torch.nn.Parameter],
                     pad_token_id: int) -> torch.Tensor:
    """g(z): the gradient of the mean answer-token loss of one example w.r.t. ``params``, flattened."""
    from alignshield.train import causal_lm_loss

    device = params[0].device
    batch = {k: v.to(device) for k, v in PadCollator(pad_token_id)([example]).items()}
    loss = causal_lm_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1).to(torch.promote_types(g.dtype, torch.float32)) for g in grads])


def scores(model: torch.nn.Module, candidates: list[Tokenized], anchors: list[Tokenized],
           settings: BenignSelection, layers: list[torch.nn.Module], pad_token_id: int,
           progress: bool = True) -> list[float]:
    """The selection score of every candidate (higher: chosen first)."""
    from tqdm.auto import tqdm

    params = [p for layer in layers[-settings.layers:] for p in layer.parameters()]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: a deterministic score
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        anchor = None
        if settings.method == "harmful-gradient":
            if not anchors:
                raise ValueError("harmful-gradient selection needs harmful anchors: finetune.harmful is empty")
            anchor = torch.stack([example_gradient(model, a, params, pad_token_id) for a in anchors]).mean(0)
        out = []
        for z in tqdm(candidates, desc=f"select ({settings.method})", unit="example", disable=not progress):
            g = example_gradient(model, z, params, pad_token_id)
            if anchor is not None:
                out.append(torch.nn.functional.cosine_similarity(g, anchor, dim=0).item())
            else:
                answer = sum(1 for t in z.labels if t != IGNORE_INDEX)
                out.append(math.log(g.pow(2).sum().item() + 1) + math.log(answer + 1))
        return out
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def top(values: list[float], k: int) -> list[int]:
    """Indices of the k highest values, highest first (the earlier index among equal values)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
