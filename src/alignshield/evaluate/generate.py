"""Batched greedy generation with left padding and the KV cache.

Prompts are sorted by length and batched, so little compute goes to padding; answers come back in
prompt order. The tokens every prompt of a batch starts with (the template's preamble, a task's
instruction) are computed once per batch and their key/value cache shared by its rows
(``share_prefix``): each row is laid out as ``prefix | padding | rest``, and the attention mask and
the positions make that the same computation as a left-padded row.

Robustness: a prompt longer than ``max_prompt_tokens`` is cut from the LEFT (the end of
the template, where the answer begins, is kept, and so are the leading special tokens such as BOS) and
reported as truncated; decoding never raises (a tokenizer that fails on some ids falls back to
token-by-token decoding with U+FFFD for what cannot be decoded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignshield.evaluate.text import clean_text
from alignshield.models.layers import cache_argument, prefix_cache

MIN_SHARED_PREFIX = 8  # tokens: below this the extra prefill call costs more than sharing saves


@dataclass
class Generation:
    answers: list[str]
    truncated: list[bool]
    """Per prompt: was it cut to ``max_prompt_tokens``."""
    prompt_tokens: list[int]
    """Per prompt: tokens fed to the model (after truncation)."""
    new_tokens: list[int]
    """Per prompt: tokens generated, up to and including the first end token."""
    token_ids: list[list[int]] | None = None
    """Per prompt: the generated token ids, up to and including the first end token."""


def encode_prompts(tokenizer, prompts: list[str], add_special_tokens: bool,
                   max_prompt_tokens: int | None) -> tuple[list[list[int]], list[bool]]:
    """Token ids per prompt, each cut from the left to ``max_prompt_tokens`` when longer."""
    special = set(tokenizer.all_special_ids)
    encoded, truncated = [], []
    for prompt in prompts:
        ids = tokenizer(clean_text(prompt), add_special_tokens=add_special_tokens).input_ids
        cut = max_prompt_tokens is not None and len(ids) > max_prompt_tokens
        if cut:
            lead = 0  # keep leading special tokens (BOS, a chat template's first marker)
            while lead < min(4, max_prompt_tokens // 2) and ids[lead] in special:
                lead += 1
            ids = ids[:lead] + ids[len(ids) - (max_prompt_tokens - lead):]
        encoded.append(ids)
        truncated.append(cut)
    return encoded, truncated


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all ``rows`` share, leaving every row at least one token of its own."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _batch_inputs(tokenizer, rows: list[list[int]], shared: int, device) -> dict[str, torch.Tensor]:
    """``prefix | left padding | rest`` per row, with its attention mask."""
    rest = [r[shared:] for r in rows]
    width = max(len(r) for r in rest)
    pad = tokenizer.pad_token_id
    ids = [r[:shared] + [pad] * (width - len(t)) + t for r, t in zip(rows, rest)]
    mask = [[1] * shared + [0] * (width - len(t)) + [1] * len(t) for t in rest]
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}


def _end_ids(tokenizer, model) -> set[int]:
    ends = tokenizer.eos_token_id
    config_ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    out: set[int] = set()
    for e in (ends, config_ends):
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(x) for x in e)
    return out


def count_new_tokens(row: list[int], ends: set[int]) -> int:
    for i, t in enumerate(row):
        if t in ends:
            return i + 1
    return len(row)


def safe_decode(tokenizer, rows: list[list[int]]) -> list[str]:
    """Decoded, stripped texts; never raises on ids a tokenizer cannot decode."""
    try:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    except Exception:  # e.g. ids beyond the tokenizer's vocabulary, a strict byte decoder
        texts = [_decode_one(tokenizer, row) for row in rows]
    return [clean_text(t).strip() for t in texts]


def _decode_one(tokenizer, row: list[int]) -> str:
    try:
        return tokenizer.decode(row, skip_special_tokens=True)
    except Exception:
        pieces = []
        for t in row:
            try:
                pieces.append(tokenizer.decode([t], skip_special_tokens=True))
            except Exception:
                pieces.append("\ufffd")
        return "".join(pieces)


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    add_special_tokens: bool = True,
    max_prompt_tokens: int | None = None,
    desc: str = "generate",
    progress: bool = True,
    share_prefix: bool = True,
) -> Generation:
    """Greedy answers plus per-prompt truncation flags and token counts."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    n = len(prompts)
    answers, new_tokens, token_ids = [""] * n, [0] * n, [[] for _ in range(n)]
    encoded, truncated = encode_prompts(tokenizer, prompts, add_special_tokens, max_prompt_tokens)
    if not n:
        return Generation(answers, truncated, [], new_tokens, token_ids)
    was_training = model.training
    model.eval()
    # generate() feeds the head the last position, a non-contiguous slice of the hidden states; with a
    # frozen head weight PyTorch then multiplies through a batch-expanded copy of the weight
    # (batch x hidden x vocab: seconds per prefill on a CPU). A contiguous input takes the plain matmul.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    contiguous = head.register_forward_pre_hook(lambda m, args: (args[0].contiguous(), *args[1:])) if head else None
    order = sorted(range(n), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    ends = _end_ids(tokenizer, model)
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            rows = [encoded[i] for i in idx]
            shared = common_prefix(rows) if share_prefix and len(rows) > 1 else 0
            if shared < MIN_SHARED_PREFIX:
                shared = 0
            batch = _batch_inputs(tokenizer, rows, shared, device)
            cache = {cache_argument(model): prefix_cache(model, batch["input_ids"][:1, :shared], len(rows))} \
                if shared else {}
            out = model.generate(**batch, **cache, generation_config=config)
            rows = out[:, batch["input_ids"].shape[1]:].tolist()
            for i, row, text in zip(idx, rows, safe_decode(tokenizer, rows)):
                answers[i] = text
                new_tokens[i] = count_new_tokens(row, ends)
                token_ids[i] = row[:new_tokens[i]]
    finally:
        model.train(was_training)
        if contiguous is not None:
            contiguous.remove()
    return Generation(answers, truncated, [len(e) for e in encoded], new_tokens, token_ids)

