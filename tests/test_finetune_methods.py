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
from alignshield.finetune.ldifs import LDIFSParams, LDIFSTrainer, feature_distance
from alignshield.finetune.lisa import ALIGNMENT, FINETUNE, LisaParams, LisaTrainer
from alignshield.finetune.vlguard import VLGuardParams, VLGuardTrainer
from alignshield.models.lora import attach_lora
from conftest import make_model, tiny_run_config

LORA = LoraSettings(r=4, alpha=8, target_modules="all-linear")
SAFE = "I'm sorry, I cannot help with that."


def _data(tokenizer, n, answer, prefix="question"):
    return [tokenize_pair(tokenizer, Example(f"{prefix} number {i}", "", answer), "alpaca", 48) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, steps=4, alignment=None, n_user=12, **train):
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0), LORA)
    args = TrainSettings(learning_rate=1e-2, max_steps=steps, batch_size=4, checkpoint_every=100, **train)
    alignment = _data(tokenizer, 10, SAFE, "harmful") if alignment is None else alignment
    return cls(model, _data(tokenizer, n_user, "positive"), args, params, seed=0, workdir=tmp_path,
               pad_token_id=tokenizer.eos_token_id, extra_data={"alignment": alignment}, progress=False)


def _batch(tokenizer, n=3):
    return PadCollator(tokenizer.eos_token_id)(_data(tokenizer, n, "positive"))


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
    trainer = _trainer(EWCTrainer, EWCParams(fisher_batches=2), tokenizer, tmp_path, alignment=alignment)
    assert trainer.fisher_batch_count == 2
    assert all(p.grad is None for p in trainer.trainable)  # the estimate leaves .grad alone
    model, collate = trainer.unwrapped_model(), PadCollator(tokenizer.eos_token_id)
    expected = [torch.zeros_like(p) for p in trainer.trainable]
    for chunk in (alignment[0:4], alignment[4:8]):
        model.zero_grad()
        model(**collate(chunk)).loss.backward()
        for e, p in zip(expected, trainer.trainable):
            e += p.grad.pow(2) / 2
    model.zero_grad()
    for f, e in zip(trainer.fisher, expected):
        torch.testing.assert_close(f.double(), e, rtol=1e-5, atol=1e-12)
    assert sum(f.sum() for f in trainer.fisher) > 0
    # None = the whole pool once (3 batches of 4 for 10 pairs); more than the pool holds is capped
    assert _trainer(EWCTrainer, EWCParams(), tokenizer, tmp_path / "a").fisher_batch_count == 3
    assert _trainer(EWCTrainer, EWCParams(fisher_batches=50), tokenizer, tmp_path / "b").fisher_batch_count == 3


def test_ewc_penalty_value_and_pull_towards_the_start(tokenizer, tmp_path):
    lamb = 3.0
    trainer = _trainer(EWCTrainer, EWCParams(lamb=lamb), tokenizer, tmp_path)
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


def test_ldifs_regulariser_against_an_explicit_aligned_copy(tokenizer, tmp_path):
    rho = 1e-2
    trainer = _trainer(LDIFSTrainer, LDIFSParams(rho=rho), tokenizer, tmp_path)
    aligned = copy.deepcopy(trainer.unwrapped_model()).eval()  # the aligned model, kept apart
    batch, model = _batch(tokenizer), trainer.model
    assert (trainer.compute_loss(model, batch) - model(**batch).loss).abs().item() < 1e-12
    _perturb(trainer)

    def layer_outputs(m):
        outs = []
        hooks = [layer.register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in m.base_model.model.model.layers]
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in hooks:
            h.remove()
        return outs

    with torch.no_grad():
        ref = layer_outputs(aligned)
    cur = layer_outputs(trainer.unwrapped_model())
    mask = batch["attention_mask"].bool()
    independent = sum(((h - r)[mask]).pow(2).sum() for h, r in zip(cur, ref)) / len(ref)
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

    full = make(tmp_path / "full")
    full.train()
    cut = make(tmp_path / "cut")
    cut.total_steps = 5  # stop in the middle of a fine-tune phase (steps 4-5)...
    cut.train()
    cut._save_checkpoint()
    resumed = make(tmp_path / "cut")
    resumed.train()  # ...and finish in a new trainer: step 5's proximal anchor comes from the checkpoint
    for a, b in zip(full.trainable, resumed.trainable):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- VLGuard


def test_vlguard_adds_exactly_guide_data_num_safe_examples(tokenizer, tmp_path):
    alignment = _data(tokenizer, 10, SAFE, "harmful")
    trainer = _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=6), tokenizer, tmp_path, steps=2,
                       alignment=alignment, n_user=12)
    assert len(trainer.sampler) == 12 + 6 and len(trainer.guide) == 6
    ids = [tuple(t.input_ids) for t in trainer.guide]
    assert len(set(ids)) == 6 and set(ids) <= {tuple(t.input_ids) for t in alignment}
    report = trainer.train()
    assert report["guide_examples"] == 6 and report["user_examples"] == 12
    with pytest.raises(ValueError, match="guide_data_num=11 exceeds the 10 pairs"):
        _trainer(VLGuardTrainer, VLGuardParams(guide_data_num=11), tokenizer, tmp_path / "b", alignment=alignment)


# ----------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("method,params,field", [
    ("ewc", {"lamb": -1}, "lamb"), ("ewc", {"fisher_batches": 0}, "fisher_batches"),
    ("kl", {"beta": -0.1}, "beta"), ("ldifs", {"rho": -1e-4}, "rho"), ("lisa", {"rho": -1}, "rho"),
    ("lisa", {"alignment_steps": 0}, "alignment_steps"), ("lisa", {"finetune_steps": 0}, "finetune_steps"),
    ("vlguard", {"guide_data_num": 0}, "guide_data_num"),
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

    for method, extra in [("ewc", []), ("kl", []), ("ldifs", []), ("lisa", []),
                          ("vlguard", ["finetune.params.guide_data_num=5"])]:
        c = cfg(f"finetune.method={method}", *extra)
        metrics = stages.run(c)
        assert "harmful_score/keyword" in metrics
        info = json.loads((stages.stage_dirs(c)["finetune"] / "stage.json").read_text())
        assert info["method"] == method
        assert info["report"]["n"] == 10 and info["report"]["n_harmful"] == 1  # the user mix stays reported
        if method == "vlguard":
            assert info["report"]["guide_examples"] == 5 and info["report"]["user_examples"] == 10
        if method == "lisa":
            assert info["report"]["alignment_steps_run"] == 1
