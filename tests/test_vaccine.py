"""Vaccine, RandomVaccine and T-Vaccine: the math against independent computations, on tiny models."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from alignshield.align.tvaccine import TVaccineParams, TVaccineTrainer
from alignshield.align.vaccine import RandomVaccineTrainer, VaccineParams, VaccineTrainer
from alignshield.config import LoraSettings, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.models.layers import LayerDiscoveryError, discover
from alignshield.models.lora import attach_lora
from conftest import TINY_FAMILIES, interrupted_and_resumed, make_model, tiny_config

LORA = LoraSettings(r=4, alpha=8, target_modules="all-linear")
LORA_DROPOUT = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear")


def _data(tokenizer, n=16, answer="I'm sorry, I cannot help with that."):
    return [tokenize_pair(tokenizer, Example(f"question number {i}", "", answer), "alpaca", 48) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, layers=2, dtype=torch.float64, steps=4, seed=0, lora=LORA,
             model=None, **train):
    model = attach_lora(model if model is not None else make_model("llama", layers=layers, dtype=dtype, seed=seed),
                        lora)
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


def test_freeze_all_freezes_inactive_layers_and_perturbs_only_active_ones(tokenizer, tmp_path):
    params = TVaccineParams(layers_per_step=1, resample_every=100, inactive="freeze-all")
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


@pytest.mark.parametrize("inactive", ["freeze-attention", "freeze-all"])
def test_checkpointing_inactive_layers_changes_nothing(tokenizer, tmp_path, inactive):
    runs = {}
    for on in (True, False):
        params = TVaccineParams(layers_per_step=2, score_every=3, resample_every=2, checkpoint_inactive=on,
                                inactive=inactive)
        trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / str(on), layers=4, steps=5,
                           lora=LORA_DROPOUT)  # dropout: the recomputation must replay the same masks
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


@pytest.mark.parametrize("inactive", ["freeze-attention", "freeze-all"])
def test_tvaccine_resume_is_bit_identical(tokenizer, tmp_path, inactive):
    params = TVaccineParams(layers_per_step=1, score_every=2, resample_every=1, inactive=inactive)

    def make(path):
        trainer = _trainer(TVaccineTrainer, params, tokenizer, path, layers=3, steps=4, dtype=torch.float32)
        trainer.args.checkpoint_every = 2
        return trainer

    full, resumed = interrupted_and_resumed(make, tmp_path, 2)  # stop after the first checkpoint...
    resumed.train()  # ...and finish in a new trainer
    assert [d for d in resumed.draws] == full.draws
    for (n, a), b in zip(full.unwrapped_model().named_parameters(), resumed.unwrapped_model().parameters()):
        assert torch.equal(a, b), n


def _lora_params(trainer):
    """(layer, 'attention' | 'mlp', name, parameter) for every LoRA parameter inside a decoder layer."""
    out = []
    for n, p in trainer.unwrapped_model().named_parameters():
        if "lora" in n and ".layers." in n:
            layer = int(n.split(".layers.")[1].split(".")[0])
            out.append((layer, "attention" if ".self_attn." in n else "mlp", n, p))
    return out


def test_freeze_attention_is_the_default_and_trains_mlp_lora_everywhere(tokenizer, tmp_path):
    """The reference (Lslland/T-Vaccine trainer.py:240-249) sets requires_grad only on the attention
    modules' parameters: the drawn layers' attention LoRA trains, MLP LoRA trains in every layer."""
    assert TVaccineParams().inactive == "freeze-attention"
    params = TVaccineParams(layers_per_step=1, resample_every=100)
    trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path, layers=3, steps=3)
    trainer.on_step_start()
    active = trainer.active
    for layer, part, n, p in _lora_params(trainer):
        assert p.requires_grad == (part == "mlp" or layer in active), n
    before = {n: p.detach().clone() for _, _, n, p in _lora_params(trainer)}
    trainer.train()
    for layer, part, n, p in _lora_params(trainer):
        changed = not torch.equal(before[n], p.detach())
        if part == "mlp" or layer in active:
            assert changed or "lora_A" in n, f"layer {layer} {part} LoRA did not train: {n}"
        else:
            assert not changed, f"inactive layer {layer}'s attention LoRA changed: {n}"
    assert set(trainer.perturbation(_batch(tokenizer), trainer.active)) == set(active)  # perturbed: drawn only
    trainer.finish()
    assert all(p.requires_grad for *_, p in _lora_params(trainer))


@pytest.mark.parametrize("inactive", ["freeze-attention", "freeze-all"])
def test_checkpointed_inactive_layers_give_the_exact_gradients(tokenizer, tmp_path, inactive):
    """One step with layers 0 and 1 not drawn (layer 0's input needs no grad: the case where reentrant
    checkpointing, the reference's under torch 2.1, returns no gradient for the MLP LoRA inside):
    every parameter's gradient is the same, bit for bit, with and without checkpointing, LoRA dropout on."""
    grads = {}
    for on in (True, False):
        params = TVaccineParams(layers_per_step=1, checkpoint_inactive=on, inactive=inactive)
        trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / str(on), layers=3, lora=LORA_DROPOUT)
        trainer.activate([2])
        assert [("forward" in layer.__dict__) for layer in trainer.layout.layers] == [on, on, False]
        trainer.model.train()
        torch.manual_seed(7)
        trainer.training_step(_batch(tokenizer))
        grads[on] = {n: (None if p.grad is None else p.grad.clone()) for layer, part, n, p in _lora_params(trainer)}
        for layer, part, n, p in _lora_params(trainer):
            trains = layer == 2 or (part == "mlp" and inactive == "freeze-attention")
            assert (p.grad is not None) == trains, n
            if trains and "lora_B" in n:
                assert p.grad.abs().sum() > 0, n  # lora_B = 0 at start, so only lora_B's gradient is nonzero
    for n, g in grads[True].items():
        assert (g is None and grads[False][n] is None) or torch.equal(g, grads[False][n]), n


# ----------------------------------------------------------------------------------- device_map


def _counting_hook():
    from accelerate.hooks import ModelHook

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    return Counting()


def _plain_forward(layer) -> bool:
    """No wrapper of anyone's: the instance has no ``forward`` of its own, or the class's, bound."""
    forward = layer.__dict__.get("forward")
    return forward is None or getattr(forward, "__func__", None) is type(layer).forward


def test_checkpointing_composes_with_an_accelerate_hook(tokenizer):
    """accelerate keeps its device hook in the layer's instance ``forward`` (the original in
    ``_old_forward``): checkpointing wraps it and switching off restores exactly it."""
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    from alignshield.align.tvaccine import set_checkpointing

    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64), LORA)
    model.config.use_cache = False  # as the loader and the trainer set it
    model.train()
    layer = discover(model).layers[0]
    hook = _counting_hook()
    add_hook_to_module(layer, hook)
    hooked = layer.__dict__["forward"]
    batch = _batch(tokenizer)

    def run():
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    clean_logits, clean_grads = run()
    for _ in range(3):  # activate / deactivate cycles
        set_checkpointing(layer, True)
        set_checkpointing(layer, True)  # idempotent: one wrapper, not two
        assert layer._hf_hook is hook and layer.__dict__["forward"] is not hooked
        calls = type(hook).calls
        logits, grads = run()
        assert type(hook).calls == calls + 2  # forward, and again on the recomputation in backward
        assert torch.equal(logits, clean_logits) and all(torch.equal(grads[n], g) for n, g in clean_grads.items())
        set_checkpointing(layer, False)
        assert layer.__dict__["forward"] is hooked and layer._hf_hook is hook
        set_checkpointing(layer, False)  # idempotent
        assert layer.__dict__["forward"] is hooked
    remove_hook_from_module(layer)
    assert _plain_forward(layer)  # accelerate leaves the class's forward, bound, in the instance

    # a hook added on top of our wrapper: switching off unwraps ours inside it, the hook stays
    set_checkpointing(layer, True)
    add_hook_to_module(layer, hook)
    set_checkpointing(layer, True)  # already on, under the hook: nothing added
    logits, _ = run()
    assert torch.equal(logits, clean_logits)
    set_checkpointing(layer, False)
    assert layer._hf_hook is hook and "_alignshield_checkpointing" not in layer.__dict__
    assert getattr(layer._old_forward, "__func__", None) is type(layer).forward
    remove_hook_from_module(layer)
    assert _plain_forward(layer)
    assert torch.equal(run()[0], clean_logits)
    set_checkpointing(layer, True)
    set_checkpointing(layer, False)
    assert _plain_forward(layer)


def test_tvaccine_under_a_device_map_keeps_the_dispatch_hooks(tokenizer, tmp_path):
    """A model dispatched by accelerate (AlignDevicesHook on every decoder layer, all on the CPU here)
    trains T-Vaccine through many layer draws exactly as the undispatched model does, and every layer
    ends with its hook, and nothing of ours, in place."""
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook

    params = TVaccineParams(layers_per_step=1, score_every=2, resample_every=1)
    runs = {}
    for dispatched in (False, True):
        model = make_model("llama", layers=3, dtype=torch.float64)
        if dispatched:
            device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                          "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)}}
            model = dispatch_model(model, device_map=device_map, force_hooks=True)
            hooked = [layer.__dict__["forward"] for layer in model.model.layers]
        trainer = _trainer(TVaccineTrainer, params, tokenizer, tmp_path / str(dispatched), steps=5, model=model)
        trainer.train()
        if dispatched:
            assert len({tuple(d["layers"]) for d in trainer.draws}) > 1  # several draws happened
            for layer, forward in zip(trainer.layout.layers, hooked):
                assert isinstance(layer._hf_hook, AlignDevicesHook)
                record = layer.__dict__.get("_alignshield_checkpointing")  # checkpointed: ours wraps the hook
                assert layer.__dict__["forward"] is (forward if record is None else record[0])
                assert record is None or record[1] is forward
            trainer.finish()
            assert [layer.__dict__["forward"] for layer in trainer.layout.layers] == hooked
        runs[dispatched] = ([h["loss"] for h in trainer.history], trainer.draws)
    assert runs[True] == runs[False]


# ----------------------------------------------------------------------------------- RandomVaccine


def _padded_batch(tokenizer):
    items = [tokenize_pair(tokenizer, Example(q, "", a), "alpaca", 200) for q, a in [
        ("hi", "No."), ("question number 1 with a much longer text to pad the others", "I'm sorry, I cannot."),
        ("question two", "I cannot help with that, it is harmful.")]]
    batch = PadCollator(tokenizer.eos_token_id)(items)
    assert (batch["attention_mask"] == 0).any()
    return batch


def test_random_vaccine_noise_is_zero_on_padding_with_global_norm_rho(tokenizer, tmp_path):
    rho = 2.0
    trainer = _trainer(RandomVaccineTrainer, VaccineParams(rho=rho), tokenizer, tmp_path)
    batch = _padded_batch(tokenizer)
    pad = batch["attention_mask"] == 0
    e = trainer.perturbation(batch, [0, 1])
    for t in e.values():
        assert torch.all(t[pad] == 0)
        assert torch.all(t[~pad].abs().sum(-1) > 0)  # every real token is perturbed
    assert abs(torch.sqrt(sum(t.pow(2).sum() for t in e.values())).item() - rho) < 1e-5  # all of rho on real tokens
    # parity with Vaccine: its gradient-based e is exactly 0 at padding too, with the same global norm
    vaccine = _trainer(VaccineTrainer, VaccineParams(rho=rho), tokenizer, tmp_path / "v")
    ev = vaccine.perturbation(batch, [0, 1])
    assert all(torch.all(t[pad] == 0) for t in ev.values())
    assert abs(torch.sqrt(sum(t.pow(2).sum() for t in ev.values())).item() - rho) < 1e-5


def test_random_vaccine_training_adds_the_masked_noise(tokenizer, tmp_path):
    """The step's perturbed loss is the loss with exactly the drawn noise added (zero at padding)."""
    trainer = _trainer(RandomVaccineTrainer, VaccineParams(rho=2.0), tokenizer, tmp_path)
    batch = _padded_batch(tokenizer)
    drawn, original = [], trainer.perturbation
    trainer.perturbation = lambda b, layers, width=None: drawn.append(original(b, layers, width)) or drawn[-1]
    trainer.model.train()
    loss = trainer.training_step(batch)
    assert len(drawn) == 1  # one draw per micro-batch, shared by both layers
    e = {i: t.clone() for i, t in drawn[0].items()}
    expected = _loss_with_explicit_e(trainer.model, trainer.layout, batch, e)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-9)


def test_random_vaccine_noise_width_is_the_attention_output_width_on_opt(tokenizer, tmp_path):
    """OPT-350m-like: word_embed_proj_dim (16) != hidden_size (32). The noise takes the attention
    output's width, not the embedding's."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("opt", layers=2)
    config.word_embed_proj_dim = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    assert model.get_input_embeddings().embedding_dim == 16
    trainer = _trainer(RandomVaccineTrainer, VaccineParams(rho=2.0), tokenizer, tmp_path, model=model)
    assert trainer.attention_width() == 32
    shapes = []
    handles = [a.register_forward_hook(lambda m, a_, out: shapes.append(tuple((out[0] if isinstance(out, tuple)
                                                                               else out).shape)))
               for a in trainer.layout.attentions]
    drawn, original = [], trainer.perturbation
    trainer.perturbation = lambda b, layers, width=None: drawn.append(original(b, layers, width)) or drawn[-1]
    trainer.model.train()
    trainer.training_step(_padded_batch(tokenizer))
    for h in handles:
        h.remove()
    assert len(shapes) == 2 and shapes[0][-1] == 32
    assert [tuple(t.shape) for t in drawn[0].values()] == shapes
    trainer.train()  # and it trains


def test_random_vaccine_resume_is_bit_identical(tokenizer, tmp_path):
    def make(path):
        trainer = _trainer(RandomVaccineTrainer, VaccineParams(rho=2.0), tokenizer, path, steps=4,
                           dtype=torch.float32)
        trainer.args.checkpoint_every = 2
        return trainer

    full, resumed = interrupted_and_resumed(make, tmp_path, 2)
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (n, a), b in zip(full.unwrapped_model().named_parameters(), resumed.unwrapped_model().parameters()):
        assert torch.equal(a, b), n
