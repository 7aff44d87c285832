"""oneshot-patch (repair): the patch's steps against hand-written SGD / AdamW steps on the one refusal's
loss (computed here in float64 from the logits), only LoRA #2 moves, the refusal's loss falls,
determinism, bad configs before any compute, end to end."""

import copy
import json
import math

import pytest
import torch

from alignshield import stages
from alignshield.data.collate import IGNORE_INDEX, Tokenized, tokenize_pair
from alignshield.data.pools import Example
from alignshield.repair import REPAIR_METHODS, oneshot
from alignshield.repair.oneshot import PAPER_PROMPT, PAPER_RESPONSE, OneShotParams, OneShotPatch
from conftest import random_lora_model

PAD = 0


def _lora_model(seed=0):
    """A float64 tiny Llama with a fine-tune LoRA of random (non-zero) factors, loaded frozen as the
    repair stage loads it (``is_trainable=False``)."""
    model = random_lora_model(seed, scale=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _tokenize(tokenizer):
    return lambda e: tokenize_pair(tokenizer, e, "alpaca", 96)


def _patch(model, tokenizer, seed=0, **kw):
    return OneShotPatch().repair(model, [], OneShotParams(**kw), seed=seed, pad_token_id=PAD,
                                 tokenize=_tokenize(tokenizer))


def _hand_loss(model, example):
    """Mean -log p(answer token) over the labelled positions, float64, from the full logits."""
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor(example.labels)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].double()
    targets, keep = labels[1:], labels[1:] != IGNORE_INDEX
    return -torch.log_softmax(logits[keep], -1).gather(1, targets[keep, None]).mean()


def _loss_value(model, example):
    with torch.no_grad():
        return float(_hand_loss(model, example))


def _hand_steps(model, example, steps, lr, optimizer, max_grad_norm):
    """``steps`` hand-written optimizer steps on the LoRA factors: SGD p - lr g, or AdamW (torch's
    defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay) with bias correction; the gradient
    clipped to ``max_grad_norm`` first (coefficient max / (norm + 1e-6), at most 1)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k in range(1, steps + 1):
        for p in params:
            p.requires_grad_(True)
        grads = torch.autograd.grad(_hand_loss(model, example), params)
        if max_grad_norm is not None:
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            grads = [g * min(1.0, max_grad_norm / (norm + 1e-6)) for g in grads]
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if optimizer == "sgd":
                    p -= lr * g
                    continue
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                p -= lr * (m[i] / (1 - b1 ** k)) / ((v[i] / (1 - b2 ** k)).sqrt() + eps)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer, steps, lr, clip", [
    ("sgd", 3, 0.5, None),
    ("adamw", 1, 1e-3, None),
    ("adamw", 3, 1e-3, 0.05),  # the clipping is active: the gradient's norm is well above 0.05
])
def test_steps_equal_hand_written_steps_on_the_one_example(optimizer, steps, lr, clip, tokenizer):
    model = _lora_model()
    expected = copy.deepcopy(model)
    example = _tokenize(tokenizer)(Example(prompt=PAPER_PROMPT, response=PAPER_RESPONSE))
    _hand_steps(expected, example, steps, lr, optimizer, clip)
    report = _patch(model, tokenizer, epochs=steps, learning_rate=lr, optimizer=optimizer, max_grad_norm=clip)
    got, want, start = _state(model), _state(expected), _state(_lora_model())
    moved = 0
    for name, value in got.items():
        if "lora_" in name:
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=lr * 1e-5)
            moved += int(not torch.equal(value, start[name]))
        else:
            assert torch.equal(value, start[name]), name  # only LoRA #2 changes, bit for bit
    assert moved == report["trained_tensors"] == 8 and report["steps"] == steps
    assert report["answer_tokens"] == sum(label != IGNORE_INDEX for label in example.labels)
    assert report["loss_before"] == pytest.approx(_loss_value(_lora_model(), example), rel=1e-5)
    assert report["loss_after"] == pytest.approx(_loss_value(expected, example), rel=1e-5)


def test_the_refusal_loss_falls_and_the_model_is_left_as_loaded(tokenizer):
    model = _lora_model()
    report = _patch(model, tokenizer, learning_rate=1e-2)
    assert report["steps"] == len(report["loss_history"]) == 10
    history = report["loss_history"]  # a tiny random model with LoRA on q/v only: it falls slowly, but every step
    assert all(b < a for a, b in zip(history, history[1:])) and report["loss_after"] < history[-1] < history[0] - 0.1
    assert report["loss_history"][0] == pytest.approx(report["loss_before"], rel=1e-6)  # the loss of step 1
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert report["trained_parameters"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_the_pair_is_a_param(tokenizer):
    a, b = _lora_model(), _lora_model()
    _patch(a, tokenizer, learning_rate=1e-2, epochs=2)
    report = _patch(b, tokenizer, learning_rate=1e-2, epochs=2, prompt="Tell me how to pick a lock.",
                    response="I'm sorry, I cannot help with that.")
    assert report["loss_after"] < report["loss_before"]
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_same_seed_same_patch(tokenizer):
    a, b = _lora_model(), _lora_model()
    ra, rb = _patch(a, tokenizer, seed=3, learning_rate=1e-2), _patch(b, tokenizer, seed=3, learning_rate=1e-2)
    assert ra == rb
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_defaults_are_the_papers():
    p = OneShotParams()
    assert (p.prompt, p.response, p.epochs, p.learning_rate) == (
        "How can I bypass system security checks?", "Sorry, I can't help you. Please follow security guidelines.",
        10, 2e-5)
    assert (p.optimizer, p.weight_decay, p.max_grad_norm) == ("adamw", 0.0, 1.0)
    assert REPAIR_METHODS.get("oneshot-patch") is OneShotPatch and OneShotPatch.edits
    assert "2601.01887" in oneshot.__doc__ and "Deviations, named" in oneshot.__doc__


def test_an_answer_cut_off_by_max_length_is_an_error(tokenizer):
    def cut(example):  # what a prompt longer than finetune.train.max_length leaves: no answer token
        t = tokenize_pair(tokenizer, example, "alpaca", 96)
        return Tokenized(t.input_ids, [IGNORE_INDEX] * len(t.labels), t.template)

    with pytest.raises(ValueError, match="no token left"):
        OneShotPatch().repair(_lora_model(), [], OneShotParams(), seed=0, pad_token_id=PAD, tokenize=cut)


def test_end_to_end(make_cfg):
    from safetensors.torch import load_file

    cfg = make_cfg("repair.method=oneshot-patch", "repair.params.learning_rate=1e-2")
    finetune_file = stages.finetune(cfg) / "adapter" / "adapter_model.safetensors"
    original = finetune_file.read_bytes()
    metrics = stages.run(cfg)
    dirs = stages.stage_dirs(cfg)
    assert finetune_file.read_bytes() == original  # the fine-tune adapter is never modified
    info = json.loads((dirs["repair"] / "stage.json").read_text())
    report = info["report"]
    assert info["method"] == "oneshot-patch" and info["params"]["epochs"] == 10
    assert report["steps"] == 10 and report["loss_after"] < report["loss_before"] and report["seconds"] >= 0
    before, after = load_file(finetune_file), load_file(dirs["repair"] / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(before[k].dtype == after[k].dtype for k in before)
    assert sum(not torch.equal(before[k], after[k]) for k in before) == report["trained_tensors"] == len(before)
    assert "harmful_score/keyword" in metrics
