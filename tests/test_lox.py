"""LoX (alignment stage): the extrapolation against the reference script's formula on dense deltas,
the whole aligned model against the reference's loop over state dicts, config errors, end to end."""

import json

import pytest
import torch

from alignshield import stages
from alignshield.align.lox import LoX, LoXParams, extrapolated_factors
from alignshield.config import ConfigError, LoraSettings, TrainSettings, load_config
from alignshield.align import ALIGN_METHODS
from alignshield.data import Example
from alignshield.data.collate import tokenize_pair
from alignshield.models.lora import attach_lora
from alignshield.train import Trainer
from conftest import make_model


def reference_lox(w_aligned: torch.Tensor, w_base: torch.Tensor, k: int, coef: float) -> torch.Tensor:
    """VITA-Group/LoX safety/LoX.py, lines 28-41, for one parameter."""
    dw = w_aligned - w_base
    if dw.dim() <= 1:
        return w_aligned
    if k > 0:
        u, s, vt = torch.linalg.svd(dw, full_matrices=False)
        s[k:] = 0
        dw = u @ torch.diag(s) @ vt
    return w_aligned + coef * dw


@pytest.mark.parametrize("k, coef", [(0, 1.0), (1, 1.0), (2, 0.5), (3, -0.25), (9, 2.0)])
def test_extrapolated_factors_give_the_reference_delta(k, coef):
    g = torch.Generator().manual_seed(k)
    b, a = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    scaling = 2.0
    new_b, new_a = extrapolated_factors(b, a, scaling, k, coef)
    assert new_b.shape == b.shape and new_a.shape == a.shape  # the same rank
    base = torch.randn(12, 7, generator=g, dtype=torch.float64)
    expected = reference_lox(base + scaling * b @ a, base, k, coef)
    torch.testing.assert_close(base + scaling * new_b @ new_a, expected, atol=1e-10, rtol=1e-10)


def test_a_zero_delta_stays_zero():
    new_b, new_a = extrapolated_factors(torch.zeros(6, 2, dtype=torch.float64),
                                        torch.randn(2, 5, dtype=torch.float64), 2.0, 0, 1.0)
    assert torch.count_nonzero(new_b @ new_a) == 0


def _trained(cls, params, tokenizer, tmp_path):
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=0),
                        LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    data = [tokenize_pair(tokenizer, Example(f"question number {i}", "", "I'm sorry, I cannot help with that."),
                          "alpaca", 40) for i in range(8)]
    args = TrainSettings(learning_rate=1e-2, max_steps=3, batch_size=4, checkpoint_every=100)
    trainer = cls(model, data, args, params, seed=0, workdir=tmp_path, pad_token_id=tokenizer.eos_token_id,
                  progress=False)
    report = trainer.train()
    return trainer.unwrapped_model().merge_and_unload().state_dict(), report


def test_lox_alignment_is_sft_then_the_reference_extrapolation_of_every_weight(tokenizer, tmp_path):
    """Trained as sft trains (same seed, same data), then every parameter equals the reference script
    applied to (the sft-aligned model, the base): LoRA targets extrapolated, the rest unchanged."""
    params = LoXParams(k=2, coef=1.5)
    lox, report = _trained(LoX, params, tokenizer, tmp_path / "lox")
    aligned, _ = _trained(Trainer, LoXParams(), tokenizer, tmp_path / "sft")
    base = make_model("llama", layers=2, dtype=torch.float64, seed=0).state_dict()
    assert set(lox) == set(aligned) == set(base)
    changed = 0
    for name, w in lox.items():
        expected = reference_lox(aligned[name], base[name], params.k, params.coef)
        torch.testing.assert_close(w, expected, atol=1e-9, rtol=1e-9, msg=name)
        changed += not torch.equal(w, aligned[name])
    assert changed == 2 * 3  # 2 layers x (q, v, down)
    assert report["lox"]["modules"] == 6

    def norm(weights):
        return sum(float(torch.linalg.norm(weights[n] - base[n]) ** 2) for n in base) ** 0.5

    assert report["lox"]["delta_norm_before"] == pytest.approx(norm(aligned), rel=1e-5)
    assert report["lox"]["delta_norm_after"] == pytest.approx(norm(lox), rel=1e-5)
    assert norm(lox) > norm(aligned)


@pytest.mark.parametrize("params, message", [({"k": -1}, "align.params.k"), ({"coef": "big"}, "align.params.coef"),
                                             ({"rank": 2}, "align.params.rank: unknown key")])
def test_bad_params_are_config_errors(params, message):
    cfg = load_config(overrides=["align.method=lox", *(f"align.params.{k}={v}" for k, v in params.items())])
    with pytest.raises(ConfigError, match=message):
        cfg.align.resolved_params(ALIGN_METHODS)


def test_end_to_end(make_cfg):
    cfg = make_cfg("align.method=lox", "align.params.k=2")
    metrics = stages.run(cfg)
    info = json.loads((stages.stage_dirs(cfg)["align"] / "stage.json").read_text())
    assert info["method"] == "lox" and info["params"] == {"k": 2, "coef": 1.0}
    assert info["report"]["lox"]["modules"] > 0 and info["report"]["steps"] == 2
    assert "harmful_score/keyword" in metrics
