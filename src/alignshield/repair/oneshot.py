"""One-shot safety patch: fine-tune the attacked model on a single refusal example for a few epochs
(Zhang et al., "Safety at One Shot: Patching Fine-Tuned LLMs with A Single Instance", ICLR 2026,
arXiv 2601.01887; code announced at github.com/Kevin-Zh-CS/safety-at-one-shot).

With (x, y) the one refusal pair (``prompt``, ``response``) rendered with the run's prompt template,
and theta the fine-tune adapter's LoRA factors (LoRA #2: every B and A), the patch runs ``epochs``
optimizer steps (batch = the one example, so one step per epoch) of supervised fine-tuning:

    L(theta) = -(1/|y|) sum_t log p_theta(y_t | x, y_<t)        (answer tokens + EOS; prompt masked)
    theta_{k+1} = AdamW(theta_k, grad L(theta_k), lr)            (or SGD: theta_k - lr grad L(theta_k))

with the gradient clipped to ``max_grad_norm`` first. It is the project's own training loop
(``alignshield.train.Trainer``: same loss, ``causal_lm_loss``, same optimizers), run on a
one-example training set; nothing but LoRA #2 changes.

Reference. The authors' repository is not in the stores this port could read, so no default is cited
to a file:line. The defaults come from the paper, as its method and setup are described (the
section numbers were not checked here):

* the single example: the paper's selected "universal" refusal, user "How can I bypass system
  security checks?", assistant "Sorry, I can't help you. Please follow security guidelines."
  (a third-party reimplementation seen in the code index ships the same pair, with a typographic
  apostrophe, as its ``oneshotpatch`` dataset);
* 10 epochs on that one instance, learning rate 2e-5 (its one-shot recovery setup; "convergence is
  achieved within just a few epochs", abstract).

Deviations, named:

* The example is fixed, not selected. The paper picks it from 256 candidate refusals (harmful
  instructions in 11 categories, answers by Llama-2-7B-Chat) by a penalty-based bi-level
  optimisation (upper level: KL to the aligned model on harmful prompts + KL to the fine-tuned
  model on task data + lambda ||w||^2). That selection is not implemented; ``prompt`` / ``response``
  set the pair (e.g. a row of ``safety_tuned_llamas``).
* The patch trains the fine-tune LoRA (#2) in place, the analogue of "fine-tune the attacked model"
  in a pipeline whose attacked model is the aligned base plus that adapter (the repair stage saves
  the adapter). The paper fine-tunes the attacked model's weights themselves (full fine-tuning as
  far as the paper's description goes). Its 2e-5 is a full-weight learning rate, kept here but not
  checked for a LoRA patch. On the embedded model, 10 AdamW steps at 2e-5 lowered the pair's loss
  from 2.59 to 2.30 (docs/methods/oneshot.md, Cost). The tiny tests use 1e-2.
* Optimizer, schedule and clipping are not given in what could be read of the paper: AdamW
  (transformers' Trainer default), constant learning rate, no warmup, no weight decay, clipping at
  1.0 (the Trainer default) are assumed; ``optimizer``, ``weight_decay`` and ``max_grad_norm`` change them.
* The prompt goes through the run's template (``template``), as every other training pair here; the
  paper uses each model's chat template.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from alignshield.config import MethodParams, ModelConfig, TrainSettings
from alignshield.data.collate import PadCollator, Tokenized
from alignshield.data.pools import Example
from alignshield.repair import REPAIR_METHODS
from alignshield.train import Trainer, causal_lm_loss

log = logging.getLogger(__name__)

PAPER_PROMPT = "How can I bypass system security checks?"
PAPER_RESPONSE = "Sorry, I can't help you. Please follow security guidelines."


class OneShotParams(MethodParams):
    """The one-shot patch's settings; defaults are the paper's (arXiv 2601.01887), see the module docstring."""

    prompt: str = Field(PAPER_PROMPT, min_length=1)
    """The harmful instruction of the one refusal example (the paper's selected universal instance)."""
    response: str = Field(PAPER_RESPONSE, min_length=1)
    """Its refusal: the answer the patch trains on (the loss covers these tokens and EOS)."""
    epochs: int = Field(10, ge=1)
    """Passes over the one example, one optimizer step each (the paper: 10)."""
    learning_rate: float = Field(2e-5, gt=0)
    """Constant learning rate (the paper's 2e-5 is for full fine-tuning; not checked for a LoRA patch)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer of LoRA #2's factors (not in what could be read of the paper; AdamW assumed)."""
    weight_decay: float = Field(0.0, ge=0)
    """The optimizer's weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient to this global L2 norm before each step; None: no clipping."""


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The fine-tune adapter's LoRA factors (every parameter named ``lora_``)."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def example_loss(model: torch.nn.Module, example: Tokenized, pad_token_id: int) -> float:
    """Mean cross-entropy of the answer tokens of ``example`` (eval mode, no gradient)."""
    was_training = model.training
    model.eval()
    try:
        batch = PadCollator(pad_token_id)([example])
        device = next(model.parameters()).device
        with torch.no_grad():
            return float(causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()}))
    finally:
        model.train(was_training)


@REPAIR_METHODS.register("oneshot-patch")
class OneShotPatch:
    """Fine-tune LoRA #2 on one refusal pair for a few epochs."""

    Params = OneShotParams
    edits = True
    uses_tokenizer = True
    """The repair stage passes ``tokenize`` (an ``Example`` to a ``Tokenized`` pair with the run's template
    and ``finetune.train.max_length``) and ``model_config`` (``cfg.model``: the training autocast)."""

    def repair(self, model, calibration, params: OneShotParams, *, seed: int, pad_token_id: int | None = None,
               tokenize: Callable[[Example], Tokenized] | None = None,
               model_config: ModelConfig | None = None) -> dict[str, Any]:
        if tokenize is None:
            raise ValueError("oneshot-patch trains on its refusal pair: the repair stage must pass tokenize")
        if pad_token_id is None:
            raise ValueError("oneshot-patch: pad_token_id is needed to batch the refusal pair")
        example = tokenize(Example(prompt=params.prompt, response=params.response))
        factors = lora_parameters(model)
        if not factors:
            raise ValueError("oneshot-patch trains the fine-tune LoRA (#2), but the model has no LoRA parameters")
        answer_tokens = sum(1 for label in example.labels if label != -100)
        if answer_tokens == 0:
            raise ValueError("oneshot-patch: the refusal has no token left after finetune.train.max_length; "
                             "shorten repair.params.prompt or raise finetune.train.max_length")
        settings = TrainSettings(
            learning_rate=params.learning_rate, epochs=params.epochs, batch_size=1, grad_accum=1,
            max_length=max(len(example.input_ids), 9), optimizer=params.optimizer, weight_decay=params.weight_decay,
            lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=params.max_grad_norm,
            checkpoint_every=params.epochs + 1, group_by_length=False)
        trains = {n: p.requires_grad for n, p in model.named_parameters()}
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        loss_before = example_loss(model, example, pad_token_id)
        try:
            with tempfile.TemporaryDirectory(prefix="oneshot-patch-") as work:
                trainer = Trainer(model, [example], settings, MethodParams(), seed=seed, workdir=work,
                                  pad_token_id=pad_token_id, model_config=model_config, progress=False)
                trainer.train()
                trainer.finish()
                history = [round(h["loss"], 6) for h in trainer.history]
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(trains[n])
            if use_cache is not None:
                config.use_cache = use_cache
            model.eval()
        loss_after = example_loss(model, example, pad_token_id)
        log.info("oneshot-patch: %d steps on one refusal (%d answer tokens), its loss %.4f -> %.4f",
                 params.epochs, answer_tokens, loss_before, loss_after)
        return {"method": "oneshot-patch", "steps": params.epochs, "answer_tokens": answer_tokens,
                "trained_tensors": len(factors), "trained_parameters": sum(p.numel() for _, p in factors),
                "loss_before": round(loss_before, 6), "loss_after": round(loss_after, 6), "loss_history": history}
