"""SafeMERGE (repair): the merge against an independent numpy port of the reference's rule (Safe LoRA's
cosine test, then PEFT's linear combination), bad configs, end to end."""

import json

import numpy as np
import pytest

from alignshield import stages
from alignshield.repair.safemerge import SafeMERGE, SafeMERGEParams
from conftest import random_lora_model


def _lora_model(seed, r, alpha, targets=("q_proj", "v_proj", "up_proj")):
    return random_lora_model(seed, r, alpha, targets)


def _factors(model):
    return {n: (m.lora_B["default"].weight.detach().numpy().copy(), m.lora_A["default"].weight.detach().numpy().copy(),
                m.scaling["default"]) for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}


def reference_merge(ft, safe, threshold, weights):
    """aladinD/SafeMERGE utils.py:168-298 in numpy: per module, cos(C B A, B A) with C = V V^T / ||V||
    (V = the safety LoRA's delta, which is also the alignment direction here); below the threshold
    PEFT's linear merge of the factors with weights (0.8, 0.2), else the fine-tune alone. The merged
    delta (scale 1) per module, and which modules merged."""
    out, merged = {}, []
    for name, (b, a, s) in ft.items():
        b1, a1, s1 = safe[name]
        v = s1 * b1 @ a1
        c = v @ v.T / np.linalg.norm(v)
        dw = b @ a
        cos = float(np.sum((c @ dw) * dw) / (np.linalg.norm(c @ dw) * np.linalg.norm(dw)))
        w = weights if cos < threshold else (1.0, 0.0)
        if cos < threshold:
            merged.append(name)
        new_b = np.sqrt(w[0] * s) * b + np.sqrt(w[1] * s1) * b1
        new_a = np.sqrt(w[0] * s) * a + np.sqrt(w[1] * s1) * a1
        out[name] = (new_b @ new_a, cos)
    return out, sorted(merged)


def test_merge_equals_the_reference_rule(tmp_path):
    align = _lora_model(0, r=4, alpha=8)
    align.save_pretrained(tmp_path / "align")
    ft = _lora_model(1, r=4, alpha=16)
    safe, before = _factors(align), _factors(ft)
    sims = {n: c for n, (_, c) in reference_merge(before, safe, 2.0, (0.8, 0.2))[0].items()}
    threshold = float(np.median(list(sims.values())))
    expected, merged = reference_merge(before, safe, threshold, (0.8, 0.2))
    report = SafeMERGE().repair(ft, [], SafeMERGEParams(threshold=threshold), seed=0, align_adapter=tmp_path / "align")
    assert report["merged"] == merged and 0 < len(merged) < len(sims) and report["n_modules"] == len(sims)
    for name, (b, a, s) in _factors(ft).items():
        np.testing.assert_allclose(s * b @ a, expected[name][0], rtol=1e-10, atol=1e-10)
        assert report["similarity"][name] == pytest.approx(expected[name][1], abs=1e-6)
        if name in merged:  # w_ft dW + w_safe V + the cross terms of a factor-wise merge
            b0, a0, s0 = before[name]
            b1, a1, s1 = safe[name]
            cross = np.sqrt(0.8 * s0 * 0.2 * s1) * (b0 @ a1 + b1 @ a0)
            np.testing.assert_allclose(s * b @ a, 0.8 * s0 * b0 @ a0 + 0.2 * s1 * b1 @ a1 + cross, rtol=1e-10)
        else:
            np.testing.assert_array_equal(b, before[name][0])


def test_a_rank_mismatch_is_an_error_naming_the_fix(tmp_path):
    _lora_model(0, r=2, alpha=4).save_pretrained(tmp_path / "align")
    with pytest.raises(ValueError, match="finetune.lora.r equal to align.lora.r"):
        SafeMERGE().repair(_lora_model(1, r=4, alpha=8), [], SafeMERGEParams(threshold=1.0), seed=0,
                           align_adapter=tmp_path / "align")


def test_end_to_end(make_cfg):
    cfg = make_cfg("repair.method=safemerge", "repair.params.threshold=1.0")
    metrics = stages.run(cfg)
    report = json.loads((stages.stage_dirs(cfg)["repair"] / "stage.json").read_text())["report"]
    assert report["n_merged"] == report["n_modules"] == 4 and "harmful_score/keyword" in metrics
