"""Batched greedy generation with left padding and the KV cache."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    add_special_tokens: bool = True,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Answers in prompt order. Prompts are batched by length so little compute goes to padding."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
            out = model.generate(**batch, generation_config=config)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
