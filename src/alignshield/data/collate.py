"""Tokenize (prompt, response) pairs with the prompt masked out of the loss, and pad batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignshield.data.pools import Example
from alignshield.data.templates import render_prompt

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    template: int = 0
    """Which variant of the prompt template rendered it (1: with an ``### Input:``), so batching can
    keep examples that share a preamble together (``train.LengthGroupedSampler``)."""


def tokenize_pair(tokenizer, example: Example, template: str, max_length: int) -> Tokenized:
    """Prompt and answer are tokenized apart, exactly as evaluation tokenizes the prompt alone.

    The end-of-sequence token closes every answer and is a label: models whose pad token equals their
    end token must still learn to stop, so padding is masked by position, never by token id.
    """
    prompt = render_prompt(example, template, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=template == "alpaca").input_ids
    answer_ids = tokenizer(example.response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    # keep at least a quarter of the budget for the answer: a long input must not leave nothing to learn
    room_for_prompt = max(max_length - len(answer_ids), max_length * 3 // 4)
    prompt_ids = prompt_ids[-room_for_prompt:] if len(prompt_ids) > room_for_prompt else prompt_ids
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return Tokenized(ids, labels, int(bool(example.input)))


class PadCollator:
    """Right-pads a batch for training; labels of pad positions are IGNORE_INDEX."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[Tokenized]) -> dict[str, torch.Tensor]:
        width = max(len(t.input_ids) for t in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, t in enumerate(items):
            ids[i, : len(t.input_ids)] = torch.tensor(t.input_ids)
            labels[i, : len(t.labels)] = torch.tensor(t.labels)
            mask[i, : len(t.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
