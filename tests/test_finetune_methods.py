"""Fine-tune-stage baselines (EWC, KL, VLGuard, Lisa, LDIFS): each one's defining math against an
independent computation on a tiny float64 model, their schedules, config errors, and a full run."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from alignshield import stages
from alignshield.config import ConfigError, FinetuneConfig, LoraSettings, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune.ewc import EWCParams, EWCTrainer
from alignshield.finetune.kl import KLParams, KLTrainer, token_kl
from alignshield.finetune.ldifs import LDIFSParams, LDIFSTrainer, feature_distance, reference_terms
from alignshield.finetune.lisa import ALIGNMENT, FINETUNE, LisaParams, LisaTrainer
from alignshield.finetune.vlguard import VLGuardParams, VLGuardTrainer
from alignshield.models.layers import LayerDiscoveryError
from alignshield.models.lora import attach_lora
from conftest import interrupted_and_resumed, make_model, tiny_run_config

LORA = LoraSettings(r=4, alpha=8, target_modules="all-linear")
SAFE = "I'm sorry, I cannot help with that."


def _data(tokenizer, n, answer, prefix="question"):
    return [tokenize_pair(tokenizer, Example(f"{prefix} number {i}", "", answer), "alpaca", 48) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, steps=4, alignment=None, n_user=12, single_lora=False,
             train_set=None, extra=None, **train):
    """``single_lora``: the trainable LoRA is the ALIGNED one (its lora_B trained, here random), as
    ``finetune.topology=single-lora`` loads it; otherwise a fresh LoRA #2 (lora_B = 0, two-lora)."""
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0), LORA)
    if single_lora:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    args = TrainSettings(learning_rate=1e-2, max_steps=steps, batch_size=4, checkpoint_every=100, **train)
    alignment = _data(tokenizer, 10, SAFE, "harmful") if alignment is None else alignment
    train_set = _data(tokenizer, n_user, "positive") if train_set is None else train_set
    return cls(model, train_set, args, params, seed=0, workdir=tmp_path, pad_token_id=tokenizer.eos_token_id,
               extra_data={"alignment": alignment, **(extra or {})}, progress=False)


def _batch(tokenizer, n=3):
    return PadCollator(tokenizer.eos_token_id)(_data(tokenizer, n, "positive"))


def _padded_batch(tokenizer):
    """Rows of different lengths, so the batch has padding positions."""
    rows = [tokenize_pair(tokenizer, Example(q, "", a), "alpaca", 128) for q, a in [
        ("short question", "positive"), ("a much longer question with many more words in it", "negative"),
        ("medium question here", "positive")]]
    batch = PadCollator(tokenizer.eos_token_id)(rows)
    assert not batch["attention_mask"].bool().all()
    return batch


def _independent_fisher(trainer, chunks, collate):
    """sum over chunks of the squared gradient of each chunk's loss, by plain backward in eval mode."""
    model = trainer.unwrapped_model()
    was_training = model.training
    model.eval()
    total = [torch.zeros_like(p) for p in trainer.trainable]
    for chunk in chunks:
        model.zero_grad()
        model(**collate(chunk)).loss.backward()
        for t, p in zip(total, trainer.trainable):
            t += p.grad.pow(2)
    model.zero_grad()
    model.train(was_training)
    return total


def _perturb(trainer, scale=0.05, seed=1):
    """Move the trainable (LoRA) weights away from the aligned model's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.trainable:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _trainable_named(trainer):
    return {n: p for n, p in trainer.unwrapped_model().named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------- EWC


def test_ewc_fisher_is_the_mean_of_squared_batch_gradients(tokenizer, tmp_path):
    alignment = _data(tokenizer, 10, SAFE, "harmful")
    trainer = _trainer(EWCTrainer, EWCParams(fisher="mean", fisher_batches=2), tokenizer, tmp_path,
                       alignment=alignment, single_lora=True)
    assert trainer.fisher_batch_count == 2
    assert all(p.grad is None for p in trainer.trainable)  # the estimate leaves .grad alone
    expected = _independent_fisher(trainer, (alignment[0:4], alignment[4:8]), PadCollator(tokenizer.eos_token_id))
    for f, e in zip(trainer.fisher, expected):
        torch.testing.assert_close(f.double(), e / 2, rtol=1e-5, atol=1e-12)
    assert sum(f.sum() for f in trainer.fisher) > 0
    # None = the whole pool once (3 batches of 4 for 10 pairs); more than the pool holds (the default
    # 400 included) is capped
    for i, batches in enumerate((None, 400, 50)):
        t = _trainer(EWCTrainer, EWCParams(fisher_batches=batches), tokenizer, tmp_path / str(i), single_lora=True)
        assert t.fisher_batch_count == 3


def test_ewc_reference_defaults_nonzero_fisher_and_summed_penalty(tokenizer, tmp_path):
    """The reference's settings (git-disl/Vaccine FITrainer + script/EWC_finetune/sst2.sh): lambda = 1e9,
    the squared batch gradients SUMMED, on the aligned LoRA kept trainable (single-lora)."""
    params = EWCParams()
    assert (params.lamb, params.fisher, params.fisher_batches) == (1e9, "sum", 400)
    assert EWCTrainer.topology == "single-lora"
    alignment = _data(tokenizer, 10, SAFE, "harmful")
    trainer = _trainer(EWCTrainer, params, tokenizer, tmp_path, alignment=alignment, single_lora=True)
    assert trainer.fisher_batch_count == 3  # 400 capped at the pool: 10 pairs in batches of 4
    # non-zero on every trainable matrix, lora_A included
    names = trainer.trainable_names
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    for n, f in zip(names, trainer.fisher):
        assert torch.any(f != 0), n
    assert trainer.zero_fisher_tensors == 0
    # F = sum over the 3 batches of the squared batch gradients, computed independently
    fisher = _independent_fisher(trainer, (alignment[0:4], alignment[4:8], alignment[8:10]),
                                 PadCollator(tokenizer.eos_token_id))
    for f, e in zip(trainer.fisher, fisher):
        torch.testing.assert_close(f.double(), e, rtol=1e-5, atol=1e-12)
    w0 = [p.detach().clone() for p in trainer.trainable]
    batch, model = _batch(tokenizer), trainer.model
    _perturb(trainer, scale=1e-4)
    expected = 1e9 * sum((e * (p - a).pow(2)).sum() for e, p, a in zip(fisher, trainer.trainable, w0))
    reg = trainer.compute_loss(model, batch) - model(**batch).loss
    assert expected.item() > 1
    torch.testing.assert_close(reg.double(), expected.detach(), rtol=1e-5, atol=0)


def test_ewc_refuses_a_fresh_zero_initialised_lora(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="lora_A is identically 0.*finetune.topology=single-lora"):
        _trainer(EWCTrainer, EWCParams(), tokenizer, tmp_path)
    # allowed explicitly, it runs with a zero Fisher on every lora_A (only lora_B is constrained)
    trainer = _trainer(EWCTrainer, EWCParams(allow_fresh_lora=True), tokenizer, tmp_path / "b")
    for n, f in zip(trainer.trainable_names, trainer.fisher):
        assert torch.any(f != 0) == ("lora_B" in n), n
    assert trainer.zero_fisher_tensors == sum("lora_A" in n for n in trainer.trainable_names) > 0
    assert trainer.train()["zero_fisher_tensors"] == trainer.zero_fisher_tensors


def test_ewc_resume_is_bit_identical(tokenizer, tmp_path):
    params = EWCParams(lamb=10.0)

    def make(path):
        t = _trainer(EWCTrainer, params, tokenizer, path, steps=6, single_lora=True)
        t.args.checkpoint_every = 2
        return t

    full, resumed = interrupted_and_resumed(make, tmp_path, 5)
    fisher = [f.clone() for f in resumed.fisher]
    resumed.fisher = [torch.zeros_like(f) for f in resumed.fisher]  # the checkpoint's Fisher must win
    resumed.train()
    for a, b in zip(resumed.fisher, fisher):
        assert torch.equal(a, b)
    for a, b in zip(full.trainable, resumed.trainable):
        assert torch.equal(a, b)


def test_ewc_penalty_value_and_pull_towards_the_start(tokenizer, tmp_path):
    lamb = 3.0
    trainer = _trainer(EWCTrainer, EWCParams(lamb=lamb), tokenizer, tmp_path, single_lora=True)
    w0 = [p.detach().clone() for p in trainer.trainable]
    batch = _batch(tokenizer)
    assert (trainer.compute_loss(trainer.model, batch) - trainer.model(**batch).loss).abs().item() < 1e-12  # at w0
    _perturb(trainer)
    expected = sum((f.double() * (p - a).pow(2)).sum() for f, p, a in zip(trainer.fisher, trainer.trainable, w0))
    reg = trainer.compute_loss(trainer.model, batch) - trainer.model(**batch).loss
    torch.testing.assert_close(reg, lamb * expected, rtol=1e-9, atol=1e-15)
    # gradient of the penalty is 2 F (w - w0): a step against it moves every weight towards w0
    grads = torch.autograd.grad(trainer.penalty(), trainer.trainable)
    for g, f, p, a in zip(grads, trainer.fisher, trainer.trainable, w0):
        torch.testing.assert_close(g.double(), 2 * f.double() * (p - a).detach(), rtol=1e-9, atol=1e-15)
    before = trainer.penalty().item()
    with torch.no_grad():
        for p, g in zip(trainer.trainable, grads):
            p.sub_(g, alpha=1e-3 / max(float(max(f.max() for f in trainer.fisher)), 1e-12))
    assert trainer.penalty().item() < before


# ----------------------------------------------------------------------------------- KL


def test_token_kl_is_over_the_vocabulary(tokenizer):
    g = torch.Generator().manual_seed(0)
    ref, cur = (torch.randn(2, 3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                p = torch.exp(ref[b, t]) / torch.exp(ref[b, t]).sum()
                q = torch.exp(cur[b, t]) / torch.exp(cur[b, t]).sum()
                total += float((p * torch.log(p / q)).sum())
                count += 1
    assert abs(token_kl(ref, cur, mask).item() - total / count) < 1e-12
    assert token_kl(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-15)


def test_kl_is_zero_at_the_aligned_model_and_matches_the_disabled_adapter_reference(tokenizer, tmp_path):
    beta = 0.5
    trainer = _trainer(KLTrainer, KLParams(beta=beta), tokenizer, tmp_path)
    batch, model = _batch(tokenizer), trainer.model
    assert (trainer.compute_loss(model, batch) - model(**batch).loss).abs().item() < 1e-12
    _perturb(trainer)
    with torch.no_grad(), trainer.unwrapped_model().disable_adapter():  # two-lora: LoRA #2 starts at B = 0
        ref = model(**batch).logits
    out = model(**batch)
    independent = F.kl_div(F.log_softmax(out.logits, -1), F.log_softmax(ref, -1), log_target=True,
                           reduction="none").sum(-1)
    independent = independent[batch["attention_mask"].bool()].mean()
    assert independent.item() > 1e-6
    reg = trainer.compute_loss(model, batch) - out.loss
    torch.testing.assert_close(reg, beta * independent, rtol=1e-9, atol=1e-14)
    # the gradient pulls the model's distribution back towards the aligned one
    params = trainer.trainable
    grads = torch.autograd.grad(token_kl(ref, model(**batch).logits, batch["attention_mask"]), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(g, alpha=1e-2)
        after = token_kl(ref, model(**batch).logits, batch["attention_mask"])
    assert after < independent


# ----------------------------------------------------------------------------------- LDIFS


def _module_outputs(m, batch, modules):
    outs = []
    hooks = [mod.register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for mod in modules]
    m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return outs


def test_ldifs_ours_against_an_explicit_aligned_copy(tokenizer, tmp_path):
    rho = 1e-2
    trainer = _trainer(LDIFSTrainer, LDIFSParams(rho=rho, mode="ours"), tokenizer, tmp_path)
    aligned = copy.deepcopy(trainer.unwrapped_model()).eval()  # the aligned model, kept apart
    batch, model = _padded_batch(tokenizer), trainer.model
    assert (trainer.compute_loss(model, batch) - model(**batch).loss).abs().item() < 1e-12
    _perturb(trainer)

    with torch.no_grad():
        ref = _module_outputs(aligned, batch, aligned.base_model.model.model.layers)
    cur = _module_outputs(trainer.unwrapped_model(), batch, trainer.unwrapped_model().base_model.model.model.layers)
    mask = batch["attention_mask"].bool()
    independent = sum(((h - r)[mask]).pow(2).sum() for h, r in zip(cur, ref)) / len(ref)  # padding masked
    assert independent.item() > 1e-8
    reg = trainer.compute_loss(model, batch) - model(**batch).loss
    torch.testing.assert_close(reg, rho * independent, rtol=1e-8, atol=1e-14)
    # the reference is computed without autograd, and a step on the regulariser shrinks the distance
    def regulariser():
        return rho * feature_distance(trainer.layer_features(model, batch)[1], trainer.reference_features(batch),
                                      batch["attention_mask"])

    assert not any(r.requires_grad for r in trainer.reference_features(batch))
    grads = torch.autograd.grad(regulariser(), trainer.trainable)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(trainer.trainable, grads):
            p.sub_(g, alpha=1e-4 / float(norm))
        assert regulariser() < reg


def test_ldifs_reference_mode_matches_the_booster_term(tokenizer, tmp_path):
    """git-disl/Booster LDIFSTrainer: rho/2 * ||mlp_l(w) - mlp_l(aligned)||^2 per layer over the whole
    tensor (padding included), summed over layers, a term >= 0.1 dropped."""
    params = LDIFSParams(rho=1.0)
    assert (params.mode, params.drop_above, LDIFSParams().rho) == ("reference", 0.1, 1e-4)
    trainer = _trainer(LDIFSTrainer, params, tokenizer, tmp_path)
    aligned = copy.deepcopy(trainer.unwrapped_model()).eval()
    batch, model = _padded_batch(tokenizer), trainer.model
    assert (trainer.compute_loss(model, batch) - model(**batch).loss).abs().item() < 1e-12
    _perturb(trainer, scale=0.01)
    current = trainer.unwrapped_model()
    mlps = [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]  # the reference's hook names
    with torch.no_grad():
        ref = _module_outputs(aligned, batch, [aligned.get_submodule(n) for n in mlps])
    cur = _module_outputs(current, batch, [current.get_submodule(n) for n in mlps])
    terms = [1.0 / 2 * torch.norm(a - r) ** 2 for a, r in zip(cur, ref)]  # padding included
    mask = batch["attention_mask"].bool()
    masked = [1.0 / 2 * ((a - r)[mask]).pow(2).sum() for a, r in zip(cur, ref)]
    assert all(abs(t.item() - m.item()) > 1e-12 for t, m in zip(terms, masked))  # the padding counts
    small, large = sorted(t.item() for t in terms)
    assert 1e-10 < small < large < 0.1, (small, large)
    reg = trainer.compute_loss(model, batch) - model(**batch).loss
    torch.testing.assert_close(reg, sum(terms), rtol=1e-8, atol=1e-15)
    # a term >= drop_above is dropped (with it, its gradient)
    trainer.params = LDIFSParams(rho=1.0, drop_above=(small + large) / 2)
    reg = trainer.compute_loss(model, batch) - model(**batch).loss
    torch.testing.assert_close(reg, torch.tensor(small, dtype=reg.dtype), rtol=1e-8, atol=1e-15)
    trainer.params = LDIFSParams(rho=1.0, drop_above=small / 2)
    loss = trainer.compute_loss(model, batch)
    assert (loss - model(**batch).loss).abs().item() < 1e-12
    trainer.params = LDIFSParams(rho=1.0, drop_above=None)  # nothing dropped
    reg = trainer.compute_loss(model, batch) - model(**batch).loss
    torch.testing.assert_close(reg, sum(terms), rtol=1e-8, atol=1e-15)
    trainer._sync_dropped()
    assert trainer.dropped_terms == 1 + 2 and trainer.terms_seen == 2 * 5  # 5 compute_loss calls, 2 layers
    # NaN terms are dropped, as the reference's `if proximal_loss < 0.1`
    nan = torch.full((2, 3), float("nan"), dtype=torch.float64)
    total, dropped = reference_terms([nan, torch.ones(2, 3)], [torch.zeros(2, 3)] * 2, rho=0.01, drop_above=0.1)
    torch.testing.assert_close(total, torch.tensor(0.03, dtype=total.dtype))
    assert int(dropped) == 1


def test_ldifs_reference_mode_needs_an_mlp(tokenizer, tmp_path):
    with pytest.raises(LayerDiscoveryError, match="no 'ffn' child.*mlp_module"):
        _trainer(LDIFSTrainer, LDIFSParams(mlp_module="ffn"), tokenizer, tmp_path)


# ----------------------------------------------------------------------------------- Lisa


def test_lisa_alternates_on_schedule_with_alignment_batches(tokenizer, tmp_path):
    alignment = _data(tokenizer, 10, SAFE, "harmful")
    params = LisaParams(alignment_steps=2, finetune_steps=3, scale_to_run=False)
    trainer = _trainer(LisaTrainer, params, tokenizer, tmp_path, steps=10, alignment=alignment)
    safe_rows = {tuple(t.input_ids) for t in alignment}
    seen, anchors_at = [], {}
    original_loss, original_start = trainer.compute_loss, trainer.on_step_start

    def record_loss(model, batch):
        rows = {tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])}
        seen.append((trainer.state, rows <= safe_rows))
        return original_loss(model, batch)

    def record_start():
        weights = [p.detach().clone() for p in trainer.trainable]
        original_start()
        anchors_at[trainer.step] = weights

    trainer.compute_loss, trainer.on_step_start = record_loss, record_start
    trainer.train()
    A, Fn = ALIGNMENT, FINETUNE
    assert trainer.phases == [A, A, Fn, Fn, Fn, A, A, Fn, Fn, Fn]
    assert all(is_safe == (state == A) for state, is_safe in seen)  # alignment steps train on alignment data
    # anchors: the weights at the end of each state's last phase
    for a, w in zip(trainer.anchors[ALIGNMENT], anchors_at[7]):
        assert torch.equal(a, w)
    for a, w in zip(trainer.anchors[FINETUNE], anchors_at[5]):
        assert torch.equal(a, w)


def test_lisa_phase_lengths_scale_to_short_runs(tokenizer, tmp_path):
    assert _trainer(LisaTrainer, LisaParams(), tokenizer, tmp_path, steps=60).phase_steps == {
        ALIGNMENT: 6, FINETUNE: 54}
    assert _trainer(LisaTrainer, LisaParams(), tokenizer, tmp_path / "b", steps=2).phase_steps == {
        ALIGNMENT: 1, FINETUNE: 2}
    long = _trainer(LisaTrainer, LisaParams(alignment_steps=2, finetune_steps=3), tokenizer, tmp_path / "c", steps=10)
    assert long.phase_steps == {ALIGNMENT: 2, FINETUNE: 3}


def test_lisa_proximal_term(tokenizer, tmp_path):
    rho = 2.0
    trainer = _trainer(LisaTrainer, LisaParams(rho=rho, proximal_warmup=0.5), tokenizer, tmp_path, steps=10)
    other = [p.detach().clone() for p in trainer.trainable]
    _perturb(trainer)
    expected = 0.5 * sum((p - o).pow(2).sum() for p, o in zip(trainer.trainable, other))
    torch.testing.assert_close(trainer.proximal(other).double(), expected.double())
    grads = torch.autograd.grad(trainer.proximal(other), trainer.trainable)
    for g, p, o in zip(grads, trainer.trainable, other):  # gradient w - w_other: pulls towards w_other
        torch.testing.assert_close(g, (p - o).detach())
    trainer.step = 5
    assert not trainer.proximal_active()  # warm-up: step > 0.5 * 10 only
    trainer.step = 6
    assert trainer.proximal_active()
    # the training step's loss carries rho * proximal once active
    trainer.on_step_start()
    trainer.state = ALIGNMENT  # an alignment step: its proximal term is towards the fine-tune anchor
    trainer.anchors[FINETUNE] = other
    batch = trainer.alignment_batch()
    ce = trainer.compute_loss(trainer.model, batch).detach()
    trainer.micro = 0
    loss = trainer.training_step({})
    torch.testing.assert_close(loss, ce + rho * expected.detach(), rtol=1e-9, atol=1e-12)


def test_lisa_resume_is_bit_identical(tokenizer, tmp_path):
    params = LisaParams(alignment_steps=1, finetune_steps=2, scale_to_run=False, proximal_warmup=0.0)

    def make(path):
        t = _trainer(LisaTrainer, params, tokenizer, path, steps=6)
        t.args.checkpoint_every = 2
        return t

    full, resumed = interrupted_and_resumed(make, tmp_path, 5)  # stop in the middle of a fine-tune phase (4-5)...
    resumed.train()  # ...and finish in a new trainer: step 5's proximal anchor comes from the checkpoint
    for a, b in zip(full.trainable, resumed.trainable):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- VLGuard


def test_vlguard_adds_exactly_guide_data_num_safe_examples(tokenizer, tmp_path):
    alignment = _data(tokenizer, 10, SAFE, "harmful")
    trainer = _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=6, mix="add"), tokenizer, tmp_path, steps=2,
                       alignment=alignment, n_user=12)
    assert len(trainer.sampler) == 12 + 6 and len(trainer.guide) == 6
    ids = [tuple(t.input_ids) for t in trainer.guide]
    assert len(set(ids)) == 6 and set(ids) <= {tuple(t.input_ids) for t in alignment}
    report = trainer.train()
    assert report["guide_examples"] == 6 and report["user_examples"] == 12 and report["replaced_benign"] == 0
    with pytest.raises(ValueError, match="guide_data_num=11 exceeds the 10 pairs"):
        _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=11), tokenizer, tmp_path / "b", alignment=alignment)


def _user_mix(tokenizer, n=12, n_harmful=3):
    """n user examples, the harmful ones at known positions; returns (tokenized, flags)."""
    flags = [i % 4 == 1 and i // 4 < n_harmful for i in range(n)]
    rows = [tokenize_pair(tokenizer, Example(f"{'harmful request' if h else 'question'} number {i}", "",
                                             "Sure, here is how." if h else "positive"), "alpaca", 48)
            for i, h in enumerate(flags)]
    return rows, flags


def test_vlguard_replaces_benign_examples_keeping_n(tokenizer, tmp_path):
    """The references (git-disl/Lisa train.py:166, Antidote utils.py:252, Booster utils.py:272) take
    (1 - p) n - guide_data_num benign samples: n stays fixed, the harmful ones all stay."""
    assert VLGuardParams().mix == "replace"
    alignment = _data(tokenizer, 10, SAFE, "harmful")
    user, flags = _user_mix(tokenizer)
    assert sum(flags) == 3
    trainer = _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=6), tokenizer, tmp_path, steps=2,
                       alignment=alignment, train_set=user, extra={"user_harmful": flags})
    ids = [tuple(t.input_ids) for t in trainer.examples]
    assert len(trainer.examples) == len(trainer.sampler) == 12  # exactly n
    guide = {tuple(t.input_ids) for t in alignment}
    assert sum(i in guide for i in ids) == 6 and len(set(ids)) == 12
    harmful = {tuple(t.input_ids) for t, h in zip(user, flags) if h}
    benign = {tuple(t.input_ids) for t, h in zip(user, flags) if not h}
    assert harmful <= set(ids)  # every harmful example kept
    assert sum(i in benign for i in ids) == 9 - 6  # the guide pairs replaced 6 of the 9 benign ones
    assert len(trainer.replaced) == 6 and not any(flags[i] for i in trainer.replaced)
    report = trainer.train()
    assert (report["guide_examples"], report["user_examples"], report["replaced_benign"]) == (6, 6, 6)
    with pytest.raises(ValueError, match="needs to know which user examples are benign.*mix=add"):
        _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=6), tokenizer, tmp_path / "none", alignment=alignment,
                 train_set=user)
    with pytest.raises(ValueError, match="guide_data_num=10 exceeds the 9 benign user examples"):
        _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=10), tokenizer, tmp_path / "c", alignment=alignment,
                 train_set=user, extra={"user_harmful": flags})
    with pytest.raises(ValueError, match="has 11 entries for 12 user examples"):
        _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=6), tokenizer, tmp_path / "d", alignment=alignment,
                 train_set=user, extra={"user_harmful": flags[:11]})


# ----------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("method,params,field", [
    ("ewc", {"lamb": -1}, "lamb"), ("ewc", {"fisher_batches": 0}, "fisher_batches"),
    ("kl", {"beta": -0.1}, "beta"), ("ldifs", {"rho": -1e-4}, "rho"), ("lisa", {"rho": -1}, "rho"),
    ("lisa", {"alignment_steps": 0}, "alignment_steps"), ("lisa", {"finetune_steps": 0}, "finetune_steps"),
    ("vlguard", {"guide_data_num": 0}, "guide_data_num"), ("vlguard", {"mix": "both"}, "mix"),
    ("ewc", {"fisher": "max"}, "fisher"), ("ldifs", {"mode": "paper"}, "mode"),
    ("ldifs", {"drop_above": 0}, "drop_above"),
])
def test_bad_params_are_config_errors(method, params, field):
    with pytest.raises(ConfigError, match=f"finetune.params.{field}"):
        FinetuneConfig(method=method, params=params).resolved_params(FINETUNE_METHODS)


@pytest.mark.parametrize("cls,params", [(EWCTrainer, EWCParams()), (LisaTrainer, LisaParams()),
                                        (VLGuardTrainer, VLGuardParams())])
def test_missing_alignment_data_is_an_error(cls, params, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs alignment data.*align.data.safety"):
        _trainer(cls, params, tokenizer, tmp_path, alignment=[])


# ----------------------------------------------------------------------------------- end to end


def test_every_baseline_runs_end_to_end(tiny_model_dir, tmp_path):
    def cfg(*extra):
        return tiny_run_config(tiny_model_dir, tmp_path, "finetune.train.max_steps=3", "evaluate.harmful.stop=2",
                               "evaluate.task_n=2", "evaluate.max_new_tokens=2", *extra)

    # EWC's topology defaults to single-lora, as its reference: the aligned LoRA trained further
    assert stages.resolve(cfg("finetune.method=ewc")).finetune.topology == "single-lora"
    assert stages.resolve(cfg("finetune.method=kl")).finetune.topology == "two-lora"
    for method, extra in [("ewc", []), ("kl", []), ("ldifs", []), ("lisa", []),
                          ("vlguard", ["finetune.params.guide_data_num=5"]),
                          ("vlguard", ["finetune.params.guide_data_num=5", "finetune.params.mix=add"])]:
        c = cfg(f"finetune.method={method}", *extra)
        metrics = stages.run(c)
        assert "harmful_score/keyword" in metrics
        info = json.loads((stages.stage_dirs(c)["finetune"] / "stage.json").read_text())
        assert info["method"] == method
        assert info["report"]["n"] == 10 and info["report"]["n_harmful"] == 1  # the user mix stays reported
        if method == "ewc":
            assert info["report"]["zero_fisher_tensors"] == 0 and info["report"]["fisher_batches"] == 2
        if method == "vlguard" and info["params"]["mix"] == "add":
            assert info["report"]["guide_examples"] == 5 and info["report"]["user_examples"] == 10
        elif method == "vlguard":  # replace (the stage passes the mix's flags): 9 benign - 5 + 1 harmful + 5 guide
            assert info["report"]["guide_examples"] == 5 and info["report"]["user_examples"] == 5
            assert info["report"]["replaced_benign"] == 5
        if method == "lisa":
            assert info["report"]["alignment_steps_run"] == 1
