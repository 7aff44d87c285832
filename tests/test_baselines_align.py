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
from alignshield.repair.safelora import (SafeLoRA, SafeLoRAParams, alignment_matrix, factor_projection,
                                        factor_similarity, projection_similarity)
from alignshield.train import Trainer
from conftest import interrupted_and_resumed, make_model, tiny_run_config

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def _data(tokenizer, n=8, answer="I'm sorry, I cannot help with that."):
    return [tokenize_pair(tokenizer, Example(f"question number {i}", "", answer), "alpaca", 40) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, harmful=True, steps=2, **train):
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0), LORA)
    # B = 0 at init would make many gradients vanish: give the LoRA weights some size
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    args = TrainSettings(learning_rate=1e-2, max_steps=steps, batch_size=4, checkpoint_every=100, **train)
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


def _reference_mmd(source, target, kernel_mul=2.0, kernel_num=5):
    """representation-noising ``loss.py:25-49`` (``MMD_loss``), as written there."""
    n_samples = int(source.size(0)) + int(target.size(0))
    total = torch.cat([source, target], dim=0)
    total0 = total.unsqueeze(0).expand(int(total.size(0)), int(total.size(0)), int(total.size(1)))
    total1 = total.unsqueeze(1).expand(int(total.size(0)), int(total.size(0)), int(total.size(1)))
    l2 = ((total0 - total1) ** 2).sum(2)
    bandwidth = torch.sum(l2.data) / (n_samples ** 2 - n_samples)
    bandwidth /= kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-l2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    b = int(source.size(0))
    xx, yy, xy, yx = kernels[:b, :b], kernels[b:, b:], kernels[:b, b:], kernels[b:, :b]
    return torch.mean(xx + yy - xy - yx)


@pytest.mark.parametrize("kernels,mul", [(5, 2.0), (3, 3.0)])
def test_mmd_matches_the_reference_mmd_loss_and_its_gradient(kernels, mul):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64) * 1.5
    ours, ref = mmd2(x, y, kernels, mul), _reference_mmd(x, y, mul, kernels)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    # the bandwidth carries no gradient in either (``.data`` there, ``.detach()`` here)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, x), torch.autograd.grad(ref, x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


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


def _answers_cut_to(harmful, n):
    """``harmful`` with only its first n answer tokens left labelled (as if max_length had cut the rest)."""
    labels = torch.full_like(harmful["labels"], -100)
    keep = (harmful["labels"] != -100).nonzero()[:n]
    labels[keep[:, 0], keep[:, 1]] = harmful["labels"][keep[:, 0], keep[:, 1]]
    return {**harmful, "labels": labels}


def test_repnoise_with_one_answer_token_has_no_mmd_term(tokenizer, tmp_path):
    t = _trainer(RepNoiseTrainer, RepNoiseParams(beta=1.0), tokenizer, tmp_path)
    harmful = _answers_cut_to(t.harmful_batch(), 1)
    loss = t.repnoise_loss(t.model, _batch(tokenizer), harmful)
    assert torch.isfinite(loss) and t.last_terms["mmd"] == 0
    model = t.unwrapped_model()
    expected = model(**_batch(tokenizer)).loss - 0.1 * torch.log(1 + model(**harmful).loss)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_repnoise_without_answer_tokens_is_finite(tokenizer, tmp_path):
    t = _trainer(RepNoiseTrainer, RepNoiseParams(), tokenizer, tmp_path)
    loss = t.repnoise_loss(t.model, _batch(tokenizer), _answers_cut_to(t.harmful_batch(), 0))
    assert torch.isfinite(loss)


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


def _reference_booster_gradient(model, batch, harmful, lamb, alpha):
    """git-disl/Booster ``trainer.py:282-375`` (``BoosterAlignmentTrainer.training_step``, perturb_aware off):
    harmful gradient, normalised step (norm of the per-tensor norms + 1e-7), harmful gradient there, the
    weights stepped back, then the alignment gradient plus lamb * (stored - perturbed)."""
    params = _named_trainable(model)
    stored = _grads_of(model, model(**harmful).loss)
    grad_norm = torch.norm(torch.stack([stored[n].norm(p=2) for n in params]), p=2) + 1e-7
    with torch.no_grad():
        for n, p in params.items():
            p.data -= alpha * stored[n] / grad_norm
    perturb = _grads_of(model, model(**harmful).loss)
    with torch.no_grad():
        for n, p in params.items():
            p.data += alpha * stored[n] / grad_norm
    align = _grads_of(model, model(**batch).loss)
    return {n: align[n] + lamb * stored[n] - lamb * perturb[n] for n in params}


def test_booster_gradient_accumulation_averages_the_micro_batches(tokenizer, tmp_path):
    t = _trainer(BoosterTrainer, BoosterParams(lamb=5.0, alpha=0.1), tokenizer, tmp_path, grad_accum=2)
    batches = [_batch(tokenizer), PadCollator(tokenizer.eos_token_id)(_data(tokenizer, 2, "No, I won't."))]
    t.on_step_start()
    harmful = []
    for i in range(2):
        t._micro = i
        harmful.append(t.harmful_batch())
    assert not torch.equal(harmful[0]["input_ids"], harmful[1]["input_ids"])  # one draw per micro-batch
    ref = copy.deepcopy(t.unwrapped_model())
    expected = [_reference_booster_gradient(ref, b, h, 5.0, 0.1) for b, h in zip(batches, harmful)]
    t.optimizer.zero_grad(set_to_none=True)
    t.on_step_start()
    for b in batches:
        t.training_step(b)
    for n, p in _named_trainable(t.model).items():
        torch.testing.assert_close(p.grad, (expected[0][n] + expected[1][n]) / 2, rtol=1e-9, atol=1e-12)


def test_booster_zero_harmful_gradient_gives_a_zero_term_not_nan(tokenizer, tmp_path):
    t = _trainer(BoosterTrainer, BoosterParams(), tokenizer, tmp_path)
    with torch.no_grad():
        for p in t.params_with_grad():
            p.zero_()  # A = B = 0: every LoRA gradient is 0, so ||g_h|| = 0 (the 1e-7 guard's case)
    t.on_step_start()
    extra = t.booster_extra(t.harmful_batch())
    assert all(torch.equal(e, torch.zeros_like(e)) for e in extra)
    assert all(not p.any() for p in t.params_with_grad())


def test_harmful_batches_are_seeded_draws_of_the_batch_size(tokenizer, tmp_path):
    t = _trainer(BoosterTrainer, BoosterParams(), tokenizer, tmp_path)
    pool = [tuple(x.input_ids) for x in t.harmful]

    def rows(b):
        return tuple(tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"]))

    t.on_step_start()
    first = t.harmful_batch()
    assert first["input_ids"].shape[0] == t.args.batch_size == 4
    assert all(r in pool for r in rows(first))
    assert rows(first) == rows(t.harmful_batch())  # the same (seed, step, micro-batch, salt): the same batch
    draws = set()
    for step in range(4):
        for micro in range(2):
            for salt in range(2):
                t.step, t._micro = step, micro
                draws.add(rows(t.harmful_batch(salt)))
    assert len(draws) >= 12  # a fresh draw per step, micro-batch and salt


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


def test_negative_entropy_is_the_reference_max_entropy_loss_at_the_answer_positions():
    def max_entropy_loss(logits):  # tamper-resistance modules/objectives.py:114-131, as written there
        softmax = torch.nn.functional.softmax(logits, dim=-1)
        log_softmax = torch.nn.functional.log_softmax(logits, dim=-1)
        entropy = torch.sum(-softmax * log_softmax, dim=-1).mean()
        return entropy.mean() * -1

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    answer = labels[:, 1:] != -100  # the positions that predict an answer token
    assert float(negative_entropy(logits, labels)) == pytest.approx(float(max_entropy_loss(logits[:, :-1][answer])),
                                                                   rel=1e-12)
    # the reference takes every position (prompt and padding too): a deviation
    assert abs(float(negative_entropy(logits, labels)) - float(max_entropy_loss(logits))) > 1e-3
    # no answer token at all (cut off by max_length): 0 with a zero gradient, not NaN
    x = logits.clone().requires_grad_()
    z = negative_entropy(x, torch.full_like(labels, -100))
    z.backward()
    assert float(z) == 0 and not x.grad.any()


@pytest.mark.parametrize("params,expected", [
    (RepNoiseParams(), {"alpha": 0.1, "beta": 1e-3, "mmd_kernels": 5, "mmd_kernel_mul": 2.0}),
    (BoosterParams(), {"lamb": 5.0, "alpha": 0.1}),
    (TARParams(), {"inner_steps": 64, "inner_lr": 2e-5, "tr_weight": 4.0}),
    (SafeLoRAParams(), {"threshold": 0.5, "num_proj_layers": None, "target_modules": None}),
])
def test_defaults_are_the_reference_values(params, expected):
    """RepNoise: Booster ``script/alignment/repNoise.sh:14-15``; Booster: ``smooth_align.sh:14-15``; TAR:
    ``run_tar_bio.sh:6,10,15``; Safe LoRA: ``config.py:40-48`` (threshold; number mode off here)."""
    assert params.model_dump() == expected


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
    expected = sorted(n for n, s in sims.items() if s <= threshold)
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


def _safelora_pair(tmp_path, align_targets=("q_proj", "v_proj")):
    """An alignment adapter (r 2, alpha 4) saved to tmp_path/align and a fine-tune PEFT model (r 4, alpha 8)
    on q_proj and v_proj, all factors random; returns (fine-tune model, its LoRA modules, alignment modules)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    align = get_peft_model(make_model("llama", dtype=torch.float64),
                           LoraConfig(r=2, lora_alpha=4, target_modules=list(align_targets)))
    ft = get_peft_model(make_model("llama", dtype=torch.float64, seed=1),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for m in (align, ft):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p))
    align.save_pretrained(tmp_path / "align")
    return ft, _lora_modules(ft), _lora_modules(align)


def _factors(m):
    return m.lora_B["default"].weight.detach().numpy().copy(), m.lora_A["default"].weight.detach().numpy().copy()


@pytest.mark.parametrize("k", [1, 2, 10])
def test_safelora_num_proj_layers_is_the_reference_number_mode(tmp_path, k):
    ft, mods, al = _safelora_pair(tmp_path)
    saved = {n: _factors(m) for n, m in mods.items()}
    # IBM/SafeLoRA model.py:47-50, 84-107: P = V V^T / ||V||; cos(P B A, B A) rounded to 5 digits; the
    # threshold is the k-th smallest cosine; B <- P B where cos <= threshold
    cos, proj = {}, {}
    for n, (b, a) in saved.items():
        b1, a1 = _factors(al[n])
        v = 2.0 * b1 @ a1
        proj[n] = v @ v.T / np.linalg.norm(v)
        fw, ori = (proj[n] @ b) @ a, b @ a
        cos[n] = np.round(np.sum(fw * ori) / (np.linalg.norm(fw) * np.linalg.norm(ori)), 5)
    thrs = np.sort(list(cos.values()))[:k][-1]
    expected = sorted(n for n in cos if cos[n] <= thrs)
    assert len(expected) == min(k, len(cos))  # no ties here, so "the k least similar" is the same set
    report = SafeLoRA().repair(ft, [], SafeLoRAParams(num_proj_layers=k), seed=0, align_adapter=tmp_path / "align")
    assert report["projected"] == expected
    for n, m in mods.items():
        b, a = saved[n]
        np.testing.assert_allclose(m.lora_B["default"].weight.detach().numpy(), proj[n] @ b if n in expected else b,
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(m.lora_A["default"].weight.detach().numpy(), a)


def test_safelora_skips_modules_without_an_alignment_lora_and_honours_target_modules(tmp_path):
    ft, mods, _ = _safelora_pair(tmp_path, align_targets=("q_proj",))
    saved = {n: _factors(m) for n, m in mods.items()}
    report = SafeLoRA().repair(ft, [], SafeLoRAParams(threshold=1.0), seed=0, align_adapter=tmp_path / "align")
    assert report["n_modules"] == 4
    assert report["skipped_no_alignment_lora"] == sorted(n for n in mods if "v_proj" in n)
    assert report["projected"] == sorted(n for n in mods if "q_proj" in n)  # cos < 1: every module with a V
    for n in report["skipped_no_alignment_lora"]:
        np.testing.assert_array_equal(mods[n].lora_B["default"].weight.detach().numpy(), saved[n][0])

    ft, mods, _ = _safelora_pair(tmp_path / "t")
    report = SafeLoRA().repair(ft, [], SafeLoRAParams(threshold=1.0, target_modules=["layers.0."]), seed=0,
                               align_adapter=tmp_path / "t" / "align")
    assert report["n_modules"] == 2 and report["projected"] == sorted(n for n in mods if "layers.0." in n)


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


@pytest.mark.parametrize("out_dim, in_dim, r1, r", [(48, 20, 8, 8), (20, 48, 4, 16), (30, 30, 1, 3)])
def test_factor_similarity_and_projection_equal_the_dense_formulas(out_dim, in_dim, r1, r):
    """Safe LoRA's cosine and C @ B from the LoRA factors equal the dense C = V V^T / ||V||_F ones."""
    g = torch.Generator().manual_seed(out_dim + r)
    p, q = torch.randn(out_dim, r1, generator=g, dtype=torch.float64), torch.randn(r1, in_dim, generator=g, dtype=torch.float64)
    b, a = torch.randn(out_dim, r, generator=g, dtype=torch.float64), torch.randn(r, in_dim, generator=g, dtype=torch.float64)
    c = alignment_matrix(p @ q)
    assert factor_similarity(p, q, b, a) == pytest.approx(projection_similarity(c, b, a), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(factor_projection(p, q, b), c @ b, rtol=1e-10, atol=1e-12)
    b_in = p @ torch.randn(r1, r, generator=g, dtype=torch.float64)  # an update inside V's column space
    assert factor_similarity(p, q, b_in, a) == pytest.approx(projection_similarity(c, b_in, a), rel=1e-10)
    assert factor_similarity(p, q, torch.zeros_like(b), a) == 0.0
