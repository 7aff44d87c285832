"""Batched greedy generation with left padding and the KV cache.

Prompts are sorted by length and batched, so little compute goes to padding; answers come back in
prompt order. Robustness: a prompt longer than ``max_prompt_tokens`` is cut from the LEFT (the end of
the template, where the answer begins, is kept, and so are the leading special tokens such as BOS) and
reported as truncated; decoding never raises (a tokenizer that fails on some ids falls back to
token-by-token decoding with U+FFFD for what cannot be decoded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignshield.evaluate.text import clean_text


@dataclass
class Generation:
    answers: list[str]
    truncated: list[bool]
    """Per prompt: was it cut to ``max_prompt_tokens``."""
    prompt_tokens: list[int]
    """Per prompt: tokens fed to the model (after truncation)."""
    new_tokens: list[int]
    """Per prompt: tokens generated, up to and including the first end token."""


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
) -> Generation:
    """Greedy answers plus per-prompt truncation flags and token counts."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    n = len(prompts)
    answers, new_tokens = [""] * n, [0] * n
    encoded, truncated = encode_prompts(tokenizer, prompts, add_special_tokens, max_prompt_tokens)
    if not n:
        return Generation(answers, truncated, [], new_tokens)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    order = sorted(range(n), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    ends = _end_ids(tokenizer, model)
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
            out = model.generate(**batch, generation_config=config)
            rows = out[:, batch["input_ids"].shape[1]:].tolist()
            for i, row, text in zip(idx, rows, safe_decode(tokenizer, rows)):
                answers[i] = text
                new_tokens[i] = count_new_tokens(row, ends)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Generation(answers, truncated, [len(e) for e in encoded], new_tokens)


def generate(
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
) -> list[str]:
    """Answers in prompt order (see ``generate_batch`` for truncation flags and token counts)."""
    return generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          add_special_tokens=add_special_tokens, max_prompt_tokens=max_prompt_tokens,
                          desc=desc, progress=progress).answers
