"""RepNoise, Booster, TAR (alignment stage) and Safe LoRA (repair): each one's defining math against an
independent computation on a tiny float64 model, config errors, and each end to end through stages.run."""

import copy
import json

import numpy as np
import pytest
import torch

from alignshield import stages
from alignshield.align.booster import BoosterParams, BoosterTrainer
from alignshield.align.repnoise import RepNoiseParams, RepNoiseTrainer, masked_ce, mmd2
from alignshield.align.tar import TARParams, TARTrainer, negative_entropy
from alignshield.config import ConfigError, LoraSettings, TrainSettings, load_config
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.models.lora import attach_lora
from alignshield.repair.safelora import SafeLoRA, SafeLoRAParams, alignment_matrix
from alignshield.train import Trainer
from conftest import interrupted_and_resumed, make_model, tiny_run_config

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def _data(tokenizer, n=8, answer="I'm sorry, I cannot help with that."):
    return [tokenize_pair(tokenizer, Example(f"question number {i}", "", answer), "alpaca", 40) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, harmful=True, steps=2):
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0), LORA)
    # B = 0 at init would make many gradients vanish: give the LoRA weights some size
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    args = TrainSettings(learning_rate=1e-2, max_steps=steps, batch_size=4, checkpoint_every=100)
    extra = {"harmful": _data(tokenizer, 6, "Sure, here is how to do it step by step.")} if harmful else {}
    return cls(model, _data(tokenizer), args, params, seed=0, workdir=tmp_path,
               pad_token_id=tokenizer.eos_token_id, extra_data=extra, progress=False)


def _batch(tokenizer):
    return PadCollator(tokenizer.eos_token_id)(_data(tokenizer, 3))


def _named_trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads_of(model, loss):
    params = _named_trainable(model)
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _step_grads(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.on_step_start()
    trainer.training_step(batch)
    return {n: p.grad.clone() for n, p in _named_trainable(trainer.model).items()}


# ------------------------------------------------------------------------------------- RepNoise


def test_mmd_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    xs, ys = x.numpy(), y.numpy()
    z = np.concatenate([xs, ys])
    pair = [np.sum((a - b) ** 2) for i, a in enumerate(z) for j, b in enumerate(z) if i != j]
    s = np.mean(pair) / 2.0 ** 2  # 5 kernels, mul 2: bandwidths s * 2^0 .. s * 2^4

    def k(a, b):
        return sum(np.exp(-np.sum((a - b) ** 2) / (s * 2.0 ** i)) for i in range(5))

    xx = np.mean([k(a, b) for a in xs for b in xs])
    yy = np.mean([k(a, b) for a in ys for b in ys])
    xy = np.mean([k(a, b) for a in xs for b in ys])
    assert float(mmd2(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert float(mmd2(x, x)) == pytest.approx(0, abs=1e-12)
    assert float(mmd2(x, y + 3)) > float(mmd2(x, y))  # a shifted distribution is further away


def test_repnoise_loss_is_the_explicit_combination(tokenizer, tmp_path):
    params = RepNoiseParams(alpha=0.3, beta=0.5)
    t = _trainer(RepNoiseTrainer, params, tokenizer, tmp_path)
    batch, harmful = _batch(tokenizer), t.harmful_batch()
    state = t.noise.get_state()
    loss = t.repnoise_loss(t.model, batch, harmful)
    # independently: CE of the aligned batch, CE of the harmful answers, MMD per hidden state
    t.noise.set_state(state)
    model = t.unwrapped_model()
    align = model(**batch).loss
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    # transformers computes its CE in float32
    assert float(masked_ce(out.logits, harmful["labels"])) == pytest.approx(float(model(**harmful).loss), rel=1e-6)
    mask = harmful["labels"] != -100
    noise = [mmd2(h[mask].float(), torch.randn(h[mask].shape, generator=t.noise)) for h in out.hidden_states[1:]]
    assert len(noise) == 2  # the 2 decoder layers' outputs
    expected = align - 0.3 * torch.log(1 + model(**harmful).loss) + 0.5 * torch.stack(noise).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------------------- Booster


def test_booster_update_matches_explicit_float64(tokenizer, tmp_path):
    t = _trainer(BoosterTrainer, BoosterParams(lamb=5.0, alpha=0.1), tokenizer, tmp_path)
    batch = _batch(tokenizer)
    t.on_step_start()
    harmful = t.harmful_batch()
    before = {n: p.detach().clone() for n, p in _named_trainable(t.model).items()}
    got = _step_grads(t, batch)
    after = _named_trainable(t.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the lookahead was undone exactly

    ref = copy.deepcopy(t.unwrapped_model())
    g_align = _grads_of(ref, ref(**batch).loss)
    g_h = _grads_of(ref, ref(**harmful).loss)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h.values()))
    with torch.no_grad():
        for n, p in _named_trainable(ref).items():
            p -= 0.1 * g_h[n] / (norm + 1e-7)  # the implementation's guard against a zero norm
    g_h2 = _grads_of(ref, ref(**harmful).loss)
    for n in got:
        expected = g_align[n] + 5.0 * (g_h[n] - g_h2[n])
        torch.testing.assert_close(got[n], expected, rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(got[n], g_align[n]) for n in got)  # the extra term matters


# ------------------------------------------------------------------------------------- TAR


def test_tar_update_differs_from_sft_and_equals_explicit_sum(tokenizer, tmp_path):
    params = TARParams(inner_steps=2, inner_lr=0.5, tr_weight=4.0)
    t = _trainer(TARTrainer, params, tokenizer, tmp_path / "tar")
    sft = _trainer(Trainer, Trainer.Params(), tokenizer, tmp_path / "sft")
    batch = _batch(tokenizer)
    t.on_step_start()
    attack = [t.harmful_batch(salt=k + 1) for k in range(2)]
    probe = t.harmful_batch(salt=0)
    got = _step_grads(t, batch)
    sft_grads = _step_grads(sft, batch)

    ref = copy.deepcopy(t.unwrapped_model())
    g_align = _grads_of(ref, ref(**batch).loss)
    for n in got:
        torch.testing.assert_close(sft_grads[n], g_align[n], rtol=1e-9, atol=1e-12)
    for h in attack:
        g = _grads_of(ref, ref(**h).loss)
        with torch.no_grad():
            for n, p in _named_trainable(ref).items():
                p -= 0.5 * g[n]
    logits = ref(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1)
    mask = probe["labels"][:, 1:] != -100
    neg_h = (logp.exp() * logp).sum(-1)[mask].mean()
    g_tr = _grads_of(ref, neg_h)
    for n in got:
        torch.testing.assert_close(got[n], g_align[n] + 4.0 * g_tr[n], rtol=1e-9, atol=1e-12)
    assert max(float((got[n] - sft_grads[n]).abs().max()) for n in got) > 1e-6

    # and the optimizer step moves the weights differently from SFT's
    t.optimizer.step()
    sft.optimizer.step()
    a, b = _named_trainable(t.model), _named_trainable(sft.model)
    assert any(not torch.allclose(a[n], b[n]) for n in a)


def test_negative_entropy():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1, -100]])
    # labels[:, 1:] = [1, -100]: only position 0 predicts an answer token; it is uniform, so -H = -log 2
    assert float(negative_entropy(logits, labels)) == pytest.approx(-np.log(2))


@pytest.mark.parametrize("cls,params", [
    (RepNoiseTrainer, RepNoiseParams(beta=1.0)), (BoosterTrainer, BoosterParams()),
    (TARTrainer, TARParams(inner_steps=1, inner_lr=0.1)),
])
def test_resume_is_bit_identical(cls, params, tokenizer, tmp_path):
    full, resumed = interrupted_and_resumed(lambda path: _trainer(cls, params, tokenizer, path, steps=3),
                                            tmp_path, 1)  # stop after one step...
    resumed.train()  # ...and finish in a new trainer: same harmful batches, same noise
    for (n, a), b in zip(full.unwrapped_model().named_parameters(), resumed.unwrapped_model().parameters()):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("cls,bad", [
    (RepNoiseParams, {"alpha": -0.1}), (RepNoiseParams, {"beta": -1}),
    (BoosterParams, {"lamb": -5}), (BoosterParams, {"alpha": 0}),
    (TARParams, {"inner_steps": 0}), (TARParams, {"tr_weight": -1}), (TARParams, {"inner_lr": 0}),
    (SafeLoRAParams, {"num_proj_layers": 0}), (SafeLoRAParams, {"threshold": 2}),
])
def test_bad_params_are_config_errors(cls, bad):
    from alignshield.align import ALIGN_METHODS
    from alignshield.repair import REPAIR_METHODS

    name = {RepNoiseParams: "repnoise", BoosterParams: "booster", TARParams: "tar", SafeLoRAParams: "safelora"}[cls]
    section = "repair" if cls is SafeLoRAParams else "align"
    registry = REPAIR_METHODS if cls is SafeLoRAParams else ALIGN_METHODS
    cfg = load_config(overrides=[f"{section}.method={name}"] + [f"{section}.params.{k}={v}" for k, v in bad.items()])
    with pytest.raises(ConfigError, match=f"{section}.params.{next(iter(bad))}"):
        getattr(cfg, section).resolved_params(registry)


@pytest.mark.parametrize("cls", [RepNoiseTrainer, BoosterTrainer, TARTrainer])
def test_no_harmful_data_is_an_error(cls, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="align.data.harmful must not be empty"):
        _trainer(cls, cls.Params(), tokenizer, tmp_path, harmful=False)


# ------------------------------------------------------------------------------------- Safe LoRA


def _lora_modules(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_safelora_projection_matches_numpy(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    align = get_peft_model(make_model("llama", dtype=torch.float64),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in align.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    align.save_pretrained(tmp_path / "align")
    ft = get_peft_model(make_model("llama", dtype=torch.float64, seed=1),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    mods = _lora_modules(ft)
    saved = {n: (m.lora_B["default"].weight.detach().numpy().copy(), m.lora_A["default"].weight.detach().numpy().copy())
             for n, m in mods.items()}
    al = _lora_modules(align)

    sims, cs = {}, {}
    for n, (b, a) in saved.items():
        m = al[n]
        v = 2.0 * m.lora_B["default"].weight.detach().numpy() @ m.lora_A["default"].weight.detach().numpy()
        c = v @ v.T / np.linalg.norm(v, "fro")
        dw = b @ a
        sims[n] = float(np.sum((c @ dw) * dw) / (np.linalg.norm(c @ dw) * np.linalg.norm(dw)))
        cs[n] = c
        np.testing.assert_allclose(alignment_matrix(torch.from_numpy(v)).numpy(), c, rtol=1e-12)
    threshold = float(np.median(list(sims.values())))
    report = SafeLoRA().repair(ft, [], SafeLoRAParams(threshold=threshold), seed=0, align_adapter=tmp_path / "align")
    expected = sorted(n for n, s in sims.items() if s < threshold)
    assert report["projected"] == expected and 0 < len(expected) < len(sims)
    for n, m in mods.items():
        b, a = saved[n]
        want_b = cs[n] @ b if n in expected else b
        np.testing.assert_allclose(m.lora_B["default"].weight.detach().numpy(), want_b, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(m.lora_A["default"].weight.detach().numpy(), a)
        assert report["similarity"][n] == pytest.approx(sims[n], abs=1e-6)
    with pytest.raises(ValueError, match="two-lora"):
        SafeLoRA().repair(ft, [], SafeLoRAParams(), seed=0, align_adapter=tmp_path / "align", topology="single-lora")
    with pytest.raises(ValueError, match="alignment stage's LoRA"):
        SafeLoRA().repair(ft, [], SafeLoRAParams(), seed=0, align_adapter=tmp_path / "missing")


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture
def make_cfg(tiny_model_dir, tmp_path):
    return lambda *extra: tiny_run_config(tiny_model_dir, tmp_path, "align.data.harmful.stop=2008",
                                          "repair.calibration.stop=2204", *extra)


@pytest.mark.parametrize("method,extra", [
    ("repnoise", []), ("booster", ["repair.method=safelora", "repair.params.threshold=1.0"]),
    ("tar", ["align.params.inner_steps=2", "align.params.inner_lr=0.01"]),
])
def test_end_to_end(make_cfg, method, extra):
    cfg = make_cfg(f"align.method={method}", *extra)
    metrics = stages.run(cfg)
    dirs = stages.stage_dirs(cfg)
    assert (dirs["align"] / "adapter" / "adapter_model.safetensors").exists()
    info = json.loads((dirs["align"] / "stage.json").read_text())
    assert info["method"] == method and info["report"]["steps"] == 2
    assert "harmful_score/keyword" in metrics
    if method == "booster":
        report = json.loads((dirs["repair"] / "stage.json").read_text())["report"]
        assert report["n_projected"] == report["n_modules"] == 4  # threshold 1: every module is projected
