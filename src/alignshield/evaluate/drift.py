"""The papers' analysis metrics, on the alignment data (``evaluate.metrics``).

Both use the first ``evaluate.analysis_n`` examples of ``align.data.safety`` (harmful prompts with safe
answers), tokenized exactly as alignment trained on them (same template, ``align.train.max_length``,
prompt masked out of the loss):

- ``alignment_loss``: the evaluated model's cross-entropy on the answer tokens (end token included),
  averaged over all those tokens (token-weighted, like a training loss over the whole set). Vaccine and
  T-Vaccine track it during fine-tuning: harmful fine-tuning makes the model "forget" the alignment
  data, and this loss rises.
- ``harmful_embedding_drift``: how far the evaluated model's hidden embeddings moved from the ALIGNED
  model's (base + LoRA #1 merged; the base for ``align.method=none``) on the same inputs. We report the
  L2 distance between the two models' last-layer hidden states (``hidden_states[-1]`` in transformers:
  the output of the final decoder layer after the final norm, what the LM head reads), per token,
  averaged over every real (non-padding) token of prompt + answer. Vaccine (Huang et al., 2024) defines
  the drift as the L2 norm of this difference over the alignment data; its code sums squared norms of
  every attention block's output over 10 batches, a number that scales with depth and batch count; the
  per-token mean of the last layer is comparable across models and pool sizes. It is 0 for identical
  models.

Memory: the two models are never loaded together. ``stages.evaluate`` loads the aligned model first,
keeps only its last-layer states (``reference_states``, on CPU, in the model's dtype), frees it, then
loads the evaluated model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignshield.config import ANALYSIS_METRICS, RunConfig
from alignshield.data.collate import IGNORE_INDEX, PadCollator, Tokenized, tokenize_pair
from alignshield.data.pools import load_pool
from alignshield.models.layers import unwrapped



def analysis_examples(cfg: RunConfig, tokenizer) -> list[Tokenized]:
    examples = load_pool(cfg.align.data.safety)[: cfg.evaluate.analysis_n]
    return [tokenize_pair(tokenizer, e, cfg.template, cfg.align.train.max_length) for e in examples]


@dataclass
class PassResult:
    loss_sum: float
    loss_tokens: int
    hidden: list[torch.Tensor] | None
    """Per example: last-layer hidden states of its real tokens, (tokens, hidden), on CPU."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.loss_tokens, 1)


def _backbone(model: torch.nn.Module):
    """The module whose output is the last hidden layer (LlamaModel, GPT2Model, ...), or None."""
    core = unwrapped(model)
    backbone = getattr(core, "base_model", None)
    return backbone if backbone is not None and backbone is not core else None


@torch.no_grad()
def forward_pass(model: torch.nn.Module, examples: list[Tokenized], pad_token_id: int, batch_size: int = 32,
                 hidden: bool = True) -> PassResult:
    """One pass over ``examples`` (right-padded, in order): summed answer-token CE, token count and,
    when ``hidden``, each example's last-layer hidden states."""
    collate = PadCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    backbone = _backbone(model) if hidden else None
    handle = None
    if backbone is not None:
        handle = backbone.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    loss_sum, loss_tokens, states = 0.0, 0, ([] if hidden else None)
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            captured.clear()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                        output_hidden_states=hidden and backbone is None)
            logits = out.logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                reduction="sum").item()
            loss_tokens += int((labels != IGNORE_INDEX).sum())
            if hidden:
                last = captured[-1] if backbone is not None else out.hidden_states[-1]
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                states.extend(last[i, :n].detach().cpu() for i, n in enumerate(lengths))
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    return PassResult(loss_sum, loss_tokens, states)


def embedding_drift(reference: list[torch.Tensor], current: list[torch.Tensor]) -> float:
    """Mean over all tokens of the L2 distance between two models' hidden states of that token."""
    if len(reference) != len(current):
        raise ValueError(f"drift needs the same examples for both models ({len(reference)} vs {len(current)})")
    total, count = 0.0, 0
    for a, b in zip(reference, current):
        if a.shape != b.shape:
            raise ValueError(f"hidden states differ in shape ({tuple(a.shape)} vs {tuple(b.shape)}): "
                             "the two models must share tokenizer and hidden size")
        distances = (a.float() - b.float()).norm(dim=-1)
        total += distances.sum().item()
        count += distances.numel()
    return total / max(count, 1)


def analysis_batch_size(cfg: RunConfig) -> int:
    """Full-vocabulary logits are large (SmolLM2: 49k x 128 tokens per example), so at most 8."""
    return min(cfg.evaluate.batch_size, 8)


def reference_states(aligned: torch.nn.Module, tokenizer, cfg: RunConfig) -> list[torch.Tensor]:
    """The aligned model's last-layer states on the analysis examples (for ``harmful_embedding_drift``)."""
    return forward_pass(aligned, analysis_examples(cfg, tokenizer), tokenizer.pad_token_id,
                        analysis_batch_size(cfg), hidden=True).hidden


def analysis_metrics(model: torch.nn.Module, tokenizer, cfg: RunConfig,
                     reference: list[torch.Tensor] | None = None) -> dict[str, float | int]:
    """The analysis metrics named in ``evaluate.metrics`` for the evaluated ``model``; ``reference`` holds the
    aligned model's states (``reference_states``) and is required for ``harmful_embedding_drift``."""
    wanted = [m for m in cfg.evaluate.metrics if m in ANALYSIS_METRICS]
    if not wanted:
        return {}
    drift = "harmful_embedding_drift" in wanted
    if drift and reference is None:
        raise ValueError("harmful_embedding_drift needs the aligned model's hidden states (reference_states)")
    examples = analysis_examples(cfg, tokenizer)
    result = forward_pass(model, examples, tokenizer.pad_token_id, analysis_batch_size(cfg), hidden=drift)
    metrics: dict[str, float | int] = {"analysis/examples": len(examples)}
    if "alignment_loss" in wanted:
        metrics["alignment_loss"] = round(result.loss, 6)
    if drift:
        metrics["harmful_embedding_drift"] = round(embedding_drift(reference, result.hidden), 6)
    return metrics
