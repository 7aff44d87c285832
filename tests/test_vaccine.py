"""Vaccine, RandomVaccine and T-Vaccine: the math against independent computations, on tiny models."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from alignshield.align.tvaccine import TVaccineParams, TVaccineTrainer
from alignshield.align.vaccine import RandomVaccineTrainer, VaccineParams, VaccineTrainer
from alignshield.config import LoraSettings, ModelConfig, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.models.layers import LayerDiscoveryError, discover
from alignshield.models.lora import attach_lora
from conftest import TINY_FAMILIES, make_model, tiny_config

LORA = LoraSettings(r=4, alpha=8, target_modules="all-linear")


def _data(tokenizer, n=16, answer="I'm sorry, I cannot help with that."):
    return [tokenize_pair(tokenizer, Example(f"question number {i}", "", answer), "alpaca", 48) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, layers=2, dtype=torch.float64, steps=4, seed=0, **train):
    model = attach_lora(make_model("llama", layers=layers, dtype=dtype, seed=seed), LORA)
    args = TrainSettings(learning_rate=1e-2, max_steps=steps, batch_size=4, checkpoint_every=100, **train)
    return cls(model, _data(tokenizer), args, params, seed=seed, workdir=tmp_path, pad_token_id=tokenizer.eos_token_id,
               extra_data={"harmful": _data(tokenizer, 12, "Sure, here is how to do it step by step.")},
               progress=False)


def _batch(tokenizer):
    return PadCollator(tokenizer.eos_token_id)(_data(tokenizer, 3))


# ----------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_discovery_finds_every_layer_and_its_attention(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(family, layers=3))
    layout = discover(attach_lora(model, LoraSettings(r=2, target_modules="all-linear")))
    assert len(layout) == 3
    assert all("attention" in type(a).__name__.lower() for a in layout.attentions)
    # the hook reaches the computation: a perturbation changes the logits
    from alignshield.models.layers import add_to_attention_outputs

    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with add_to_attention_outputs(layout.attentions, lambda i, h: torch.ones_like(h)):
            shifted = model(input_ids=ids).logits
    assert not torch.allclose(clean, shifted)


def test_discovery_fails_loudly_naming_the_model():
    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    with pytest.raises(LayerDiscoveryError, match="NoAttention: decoder layer 0 .* has no self-attention"):
        discover(NoAttention())
    with pytest.raises(LayerDiscoveryError, match="not a module list"):
        discover(make_model(), decoder_layers="model.norm")


def test_discovery_override(tokenizer):
    layout = discover(make_model(), decoder_layers="model.layers", attention_module="self_attn")
    assert len(layout) == 2


# ----------------------------------------------------------------------------------- Vaccine math


def _independent_attention_grads(model, layout, batch):
    """Gradient of the loss w.r.t. each attention output, by retain_grad on captured outputs."""
    captured = []

    def capture(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h.retain_grad()
        captured.append(h)

    handles = [a.register_forward_hook(capture) for a in layout.attentions]
    model.zero_grad()
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    grads = [h.grad.clone() for h in captured]
    model.zero_grad()
    return grads


def test_pass_one_gives_activation_gradients_only(tokenizer, tmp_path):
    trainer = _trainer(VaccineTrainer, VaccineParams(), tokenizer, tmp_path)
    batch = _batch(tokenizer)
    grads = trainer.attention_gradients(batch, [0, 1])
    assert all(p.grad is None for p in trainer.model.parameters())  # no parameter gradient in pass 1
    reference = _independent_attention_grads(trainer.model, trainer.layout, batch)
    for i in (0, 1):
        torch.testing.assert_close(grads[i], reference[i], rtol=1e-10, atol=1e-12)


def test_perturbation_has_norm_rho_and_points_along_the_gradient(tokenizer, tmp_path):
    rho = 2.0
    trainer = _trainer(VaccineTrainer, VaccineParams(rho=rho), tokenizer, tmp_path)
    batch = _batch(tokenizer)
    e = trainer.perturbation(batch, [0, 1])
    g = _independent_attention_grads(trainer.model, trainer.layout, batch)
    flat_e = torch.cat([e[0].flatten(), e[1].flatten()])
    flat_g = torch.cat([t.flatten() for t in g])
    assert abs(flat_e.norm().item() - rho) < 1e-5
    assert torch.nn.functional.cosine_similarity(flat_e, flat_g, dim=0).item() > 1 - 1e-9
    # one global norm, not one per layer: the layers keep their relative sizes
    ratio = e[0].norm() / e[1].norm()
    torch.testing.assert_close(ratio, g[0].norm() / g[1].norm())


def _loss_with_explicit_e(model, layout, batch, e):
    """The perturbed loss written independently: each attention module's forward is wrapped by hand."""
    originals = []
    for i, attn in enumerate(layout.attentions):
        forward = attn.forward

        def wrapped(*args, _forward=forward, _e=e[i], **kwargs):
            out = _forward(*args, **kwargs)
            return (out[0] + _e, *out[1:]) if isinstance(out, tuple) else out + _e

        originals.append(forward)
        attn.forward = wrapped
    try:
        # the loss in float64 from the logits (transformers' own loss upcasts logits to float32 only)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].double().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
    finally:
        for attn in layout.attentions:
            del attn.forward


def test_update_gradient_is_the_gradient_of_the_perturbed_loss(tokenizer, tmp_path):
    trainer = _trainer(VaccineTrainer, VaccineParams(rho=20.0), tokenizer, tmp_path)
    model, batch = trainer.model, _batch(tokenizer)
    e = {i: t.detach().clone() for i, t in trainer.perturbation(batch, [0, 1]).items()}
    model.zero_grad()
    trainer.training_step(batch)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    e_leaf = {i: t.clone().requires_grad_() for i, t in e.items()}
    _loss_with_explicit_e(model, trainer.layout, batch, e_leaf).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-9)
    # e is a constant in pass 2: the training step never builds a graph through it
    assert all(not t.requires_grad for t in trainer.perturbation(batch, [0, 1]).values())

    model.zero_grad()
    _loss_with_explicit_e(model, trainer.layout, batch, {0: 0.0, 1: 0.0}).backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # Finite differences of the explicit perturbed loss along two directions in LoRA space: our
    # gradient itself, and the direction that separates it from the clean (unperturbed) gradient.
    # HF norms and softmax run in float32 even in a float64 model, hence the step 1e-3.
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def directional(direction):
        eps = 1e-3
        with torch.no_grad():
            for n, p in params.items():
                p.add_(direction[n], alpha=eps)
            up = _loss_with_explicit_e(model, trainer.layout, batch, e).item()
            for n, p in params.items():
                p.add_(direction[n], alpha=-2 * eps)
            down = _loss_with_explicit_e(model, trainer.layout, batch, e).item()
            for n, p in params.items():
                p.add_(direction[n], alpha=eps)
        return (up - down) / (2 * eps)

    def unit(d):
        norm = torch.sqrt(sum(v.pow(2).sum() for v in d.values()))
        return {n: v / norm for n, v in d.items()}

    def dot(a, b):
        return sum((a[n] * b[n]).sum() for n in a).item()

    along = unit(ours)
    assert abs(directional(along) - dot(ours, along)) <= 1e-2 * dot(ours, along)
    apart = unit({n: ours[n] - clean[n] for n in ours})
    gap = dot(ours, apart) - dot(clean, apart)  # = ||ours - clean|| > 0
    assert abs(directional(apart) - dot(ours, apart)) <= 0.1 * gap


def test_vaccine_trains_and_differs_from_sft(tokenizer, tmp_path):
    from alignshield.train import Trainer

    vac = _trainer(VaccineTrainer, VaccineParams(rho=5.0), tokenizer, tmp_path / "v", steps=3)
    sft = _trainer(Trainer, VaccineParams(), tokenizer, tmp_path / "s", steps=3)
    vac.train(), sft.train()
    assert vac.history[0]["loss"] > sft.history[0]["loss"]  # the first step's loss is the perturbed one


def test_random_vaccine_same_norm_independent_of_gradient(tokenizer, tmp_path):
    trainer = _trainer(RandomVaccineTrainer, VaccineParams(rho=2.0), tokenizer, tmp_path)
    batch = _batch(tokenizer)
    e = trainer.perturbation(batch, [0, 1])
    assert abs(torch.sqrt(sum(t.pow(2).sum() for t in e.values())).item() - 2.0) < 1e-5
    g = _independent_attention_grads(trainer.model, trainer.layout, batch)
    cos = torch.nn.functional.cosine_similarity(torch.cat([t.flatten() for t in e.values()]),
                                                torch.cat([t.flatten() for t in g]), dim=0)
    assert abs(cos.item()) < 0.1
    # the noise does not look at the data: another batch of the same shape gets the same draw
    other = _trainer(RandomVaccineTrainer, VaccineParams(rho=2.0), tokenizer, tmp_path / "o")
    flipped = dict(batch, labels=torch.where(batch["labels"] >= 0, 5, -100))
    e2 = other.perturbation(flipped, [0, 1])
    assert all(torch.equal(e[i], e2[i]) for i in (0, 1))


def test_cheap_mode_refreshes_every_k_steps(tokenizer, tmp_path):
    trainer = _trainer(VaccineTrainer, VaccineParams(rho=2.0, refresh_every=3), tokenizer, tmp_path, steps=6)
    calls = []
    original = trainer.attention_gradients
    trainer.attention_gradients = lambda b, layers: calls.append(trainer.step) or original(b, layers)
    trainer.train()
    assert calls == [0, 3]
    batch = _batch(tokenizer)
    e = trainer.perturbation(batch, [0, 1])
    tokens = batch["attention_mask"].sum()
    total = torch.sqrt(sum(t.pow(2).sum() for t in e.values()) * tokens)  # one shared vector per token
    assert abs(total.item() - 2.0) < 1e-5


# ----------------------------------------------------------------------------------- T-Vaccine


def test_sampling_draws_distinct_layers_with_probability_proportional_to_scores(tokenizer, tmp_path):
    trainer = _trainer(TVaccineTrainer, TVaccineParams(layers_per_step=3), tokenizer, tmp_path, layers=6)
    scores = torch.tensor([1.0, 5.0, 0.5, 3.0, 0.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = 4000
    ours = Counter()
    for _ in range(draws):
        chosen = trainer.sample_layers(scores, 3, g)
        assert len(set(chosen)) == 3
        ours.update(chosen)
    # independent reference: numpy's successive sampling without replacement, p proportional to score
    rng = np.random.default_rng(0)
    p = (scores / scores.sum()).numpy()
    ref = Counter()
    for _ in range(20000):
        ref.update(rng.choice(6, 3, replace=False, p=p).tolist())
    for layer in range(6):
        expected = ref[layer] / 20000
        observed = ours[layer] / draws
        assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-3
    assert ours[4] <= 2  # a zero score is (almost) never drawn


def test_single_draw_frequencies_follow_scores(tokenizer, tmp_path):
    trainer = _trainer(TVaccineTrainer, TVaccineParams(layers_per_step=1), tokenizer, tmp_path, layers=4)
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(1)
    counts = Counter(trainer.sample_layers(scores, 1, g)[0] for _ in range(3000))
    expected = (scores / scores.sum() * 3000).tolist()
    chi2 = sum((counts[i] - expected[i]) ** 2 / expected[i] for i in range(4))
    assert chi2 < 16.27  # the chi-square critical value for 3 degrees of freedom at p = 0.001


def test_schedule_k_and_j_are_honoured(tokenizer, tmp_path):
    params = TVaccineParams(layers_per_step=2, score_every=4, resample_every=2)
    trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path, layers=4, steps=8)
    scored = []
    original = trainer.layer_scores
    trainer.layer_scores = lambda: scored.append(trainer.step) or original()
    report = trainer.train()
    assert scored == [0, 4]
    assert [d["step"] for d in trainer.draws] == [0, 2, 4, 6]
    assert all(len(d["layers"]) == 2 == len(set(d["layers"])) for d in trainer.draws)
    # the report holds the schedule: each scoring, each draw, and the steps each layer trained
    assert [s["step"] for s in report["layer_scorings"]] == [0, 4] and report["layer_draws"] == trainer.draws
    expected = [2 * sum(i in d["layers"] for d in trainer.draws) for i in range(4)]
    assert report["active_steps_per_layer"] == expected and sum(expected) == 8 * 2


def test_inactive_layers_are_frozen_and_only_active_ones_perturbed(tokenizer, tmp_path):
    params = TVaccineParams(layers_per_step=1, resample_every=100)
    trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path, layers=3, steps=3)
    trainer.on_step_start()
    active = trainer.active
    before = {n: p.detach().clone() for n, p in trainer.unwrapped_model().named_parameters() if "lora" in n}
    trainer.train()
    for n, p in trainer.unwrapped_model().named_parameters():
        if "lora" not in n or ".layers." not in n:
            continue
        layer = int(n.split(".layers.")[1].split(".")[0])
        changed = not torch.equal(before[n], p.detach())
        if layer in active:
            assert changed or "lora_A" in n  # lora_B starts at zero and must move; A may stay within tolerance
        else:
            assert not changed, f"frozen layer {layer} changed: {n}"
    assert set(trainer.perturbation(_batch(tokenizer), trainer.active)) == set(active)


def test_checkpointing_inactive_layers_changes_nothing(tokenizer, tmp_path):
    runs = {}
    for on in (True, False):
        params = TVaccineParams(layers_per_step=2, score_every=3, resample_every=2, checkpoint_inactive=on)
        trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / str(on), layers=4, steps=5)
        trainer.train()
        runs[on] = (trainer.history, trainer.draws,
                    {n: p.detach().clone() for n, p in trainer.unwrapped_model().named_parameters() if "lora" in n})
    assert runs[True][1] == runs[False][1]
    np.testing.assert_allclose([h["loss"] for h in runs[True][0]], [h["loss"] for h in runs[False][0]], rtol=1e-10)
    for n, w in runs[True][2].items():
        torch.testing.assert_close(w, runs[False][2][n], rtol=1e-9, atol=1e-12)


def test_layers_per_step_is_clamped_with_a_warning(tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="exceeds the model's 2 layers"):
        trainer = _trainer(TVaccineTrainer, TVaccineParams(layers_per_step=8), tokenizer, tmp_path)
    assert trainer.n_active == 2


def test_tvaccine_resume_is_bit_identical(tokenizer, tmp_path):
    params = TVaccineParams(layers_per_step=1, score_every=2, resample_every=1)
    full = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / "full", layers=3, steps=4, dtype=torch.float32)
    full.args.checkpoint_every = 2
    full.train()
    cut = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / "cut", layers=3, steps=4, dtype=torch.float32)
    cut.args.checkpoint_every = 2
    cut.total_steps = 2  # stop after the first checkpoint...
    cut.train()
    cut._save_checkpoint()
    resumed = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / "cut", layers=3, steps=4, dtype=torch.float32)
    resumed.train()  # ...and finish in a new trainer
    assert [d for d in resumed.draws] == full.draws
    for (n, a), b in zip(full.unwrapped_model().named_parameters(), resumed.unwrapped_model().parameters()):
        assert torch.equal(a, b), n
