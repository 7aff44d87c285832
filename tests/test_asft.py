"""AsFT (fine-tune stage): the penalty against the reference's dense formula, the loss it trains on,
config errors before any compute, end to end."""

import json

import numpy as np
import pytest
import torch

from alignshield import stages
from alignshield.config import ConfigError, LoraSettings, TrainSettings
from alignshield.data import Example
from alignshield.data.collate import PadCollator, tokenize_pair
from alignshield.finetune.asft import AsFTParams, AsFTTrainer
from alignshield.models.lora import attach_lora
from alignshield.train import Trainer
from conftest import make_model

ALIGN = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
FINETUNE = LoraSettings(r=2, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])  # o_proj: no alignment LoRA


def _random_lora(model, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _data(tokenizer, n=8):
    return [tokenize_pair(tokenizer, Example(f"review number {i}", "", "positive"), "alpaca", 40) for i in range(n)]


def _trainer(cls, params, tokenizer, tmp_path, grad_accum=1):
    align = _random_lora(attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0), ALIGN), 1)
    align.save_pretrained(tmp_path / "align")
    model = _random_lora(attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0), FINETUNE), 2)
    args = TrainSettings(learning_rate=1e-2, max_steps=2, batch_size=4, grad_accum=grad_accum, checkpoint_every=100)
    trainer = cls(model, _data(tokenizer), args, params, seed=0, workdir=tmp_path / "ft",
                  pad_token_id=tokenizer.eos_token_id, extra_data={"align_adapter": tmp_path / "align"},
                  progress=False)
    return trainer, align


def reference_penalty(align, model, scaled=False) -> float:
    """PKU-YuanGroup/AsFT utils/AsFT_train_utils.py:101-117 with C from AsFT_finetuning.py:79-89, dense,
    numpy: sum over the fine-tune LoRA's modules of ||(I - C) B A||_F^2, V = the alignment LoRA's delta."""
    mods = {n: m for n, m in align.base_model.model.named_modules() if hasattr(m, "lora_A")}
    total = 0.0
    for name, m in model.base_model.model.named_modules():
        if not hasattr(m, "lora_A") or name not in mods:
            continue
        a1 = mods[name].lora_A["default"].weight.detach().numpy()
        b1 = mods[name].lora_B["default"].weight.detach().numpy()
        v = mods[name].scaling["default"] * b1 @ a1
        c = v @ v.T / np.linalg.norm(v)
        dw = m.lora_B["default"].weight.detach().numpy() @ m.lora_A["default"].weight.detach().numpy()
        if scaled:
            dw = m.scaling["default"] * dw
        total += np.linalg.norm((np.eye(c.shape[0]) - c) @ dw) ** 2
    return float(total)


@pytest.mark.parametrize("scaled", [False, True])
def test_penalty_equals_the_reference_dense_formula(tokenizer, tmp_path, scaled):
    trainer, align = _trainer(AsFTTrainer, AsFTParams(scaled_delta=scaled), tokenizer, tmp_path)
    assert len(trainer.anchors) == 4 and all("o_proj" in n for n in trainer.unanchored)
    expected = reference_penalty(align, trainer.unwrapped_model(), scaled)
    assert expected > 0
    assert float(trainer.regulariser().detach()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_loss_is_the_task_loss_plus_lambda_times_the_penalty_undivided_by_accumulation(tokenizer, tmp_path,
                                                                                      grad_accum):
    trainer, align = _trainer(AsFTTrainer, AsFTParams(lambda_reg=0.5), tokenizer, tmp_path, grad_accum)
    plain, _ = _trainer(Trainer, AsFTParams(), tokenizer, tmp_path / "plain", grad_accum)
    batch = PadCollator(tokenizer.eos_token_id)(_data(tokenizer, 3))
    penalty = reference_penalty(align, trainer.unwrapped_model())
    ce = float(plain.compute_loss(plain.model, batch).detach())
    loss = trainer.compute_loss(trainer.model, batch)
    # what backward sees per micro-batch: loss / grad_accum = CE / grad_accum + lambda * penalty (the reference's)
    assert float(loss.detach()) / grad_accum == pytest.approx(ce / grad_accum + 0.5 * penalty, rel=1e-7)
    loss.backward()
    b = trainer.anchors[0].target.factor("lora_B").weight
    assert b.grad is not None and torch.count_nonzero(b.grad)


def test_lambda_zero_is_plain_sft(tokenizer, tmp_path):
    trainer, _ = _trainer(AsFTTrainer, AsFTParams(lambda_reg=0), tokenizer, tmp_path)
    plain, _ = _trainer(Trainer, AsFTParams(), tokenizer, tmp_path / "plain")
    batch = PadCollator(tokenizer.eos_token_id)(_data(tokenizer, 3))
    loss, plain_loss = trainer.compute_loss(trainer.model, batch), plain.compute_loss(plain.model, batch)
    assert float(loss.detach()) == float(plain_loss.detach())


@pytest.mark.parametrize("extra, message", [
    (["align.method=none"], "align.method=none trains none"),
    (["finetune.topology=single-lora"], "needs finetune.topology=two-lora, not single-lora"),
    (["finetune.params.lambda_reg=-1"], "finetune.params.lambda_reg"),
    (["finetune.params.lambda=1"], "finetune.params.lambda: unknown key; did you mean 'lambda_reg'"),
])
def test_bad_configs_fail_before_any_compute(make_cfg, extra, message, monkeypatch):
    monkeypatch.setattr(stages, "_train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=message):
        stages.run(make_cfg("finetune.method=asft", *extra))


def test_end_to_end(make_cfg):
    cfg = make_cfg("finetune.method=asft")
    metrics = stages.run(cfg)
    info = json.loads((stages.stage_dirs(cfg)["finetune"] / "stage.json").read_text())
    assert info["method"] == "asft" and info["params"] == {"lambda_reg": 1.0, "scaled_delta": False}
    assert info["report"]["steps"] == 2 and "harmful_score/keyword" in metrics
    assert info["report"]["asft"] == {"anchored": 4, "unanchored": []}  # q and v of 2 layers, as LoRA #1
