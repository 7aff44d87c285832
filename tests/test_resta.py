"""RESTA (repair): W_ft + scale * V against a dense computation by hand, DARE's seeded drop and rescale,
only LoRA #2 changes, the saved adapter round-trips, bad configs, end to end."""

import hashlib
import json

import numpy as np
import pytest
import torch

from alignshield import stages
from alignshield.repair.resta import Resta, RestaParams
from alignshield.seeding import generator
from conftest import make_model, random_lora_model


def _lora_model(seed, r, alpha, targets=("q_proj", "v_proj")):
    return random_lora_model(seed, r, alpha, targets, base_seed=0)


def _modules(model):
    return {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}


def _by_hand(model):
    """{module: (W, s B A, the effective weight W + s B A)} in numpy, from the raw factors."""
    out = {}
    for n, m in _modules(model).items():
        w = m.base_layer.weight.detach().numpy().copy()
        b, a = m.lora_B["default"].weight.detach().numpy(), m.lora_A["default"].weight.detach().numpy()
        out[n] = (w, m.scaling["default"] * b @ a)
    return out


def _safety(model):
    """{module: V = s1 B1 A1} of an alignment LoRA model, in numpy."""
    return {n: m.scaling["default"] * m.lora_B["default"].weight.detach().numpy() @ m.lora_A["default"].weight.detach().numpy()
            for n, m in _modules(model).items()}


def _effective(model):
    return {n: (m.base_layer.weight + m.get_delta_weight("default")).detach().numpy() for n, m in _modules(model).items()}


@pytest.fixture
def pair(tmp_path):
    """(aligned LoRA #1 folder, V per module, fine-tune PeftModel with LoRA #2 of another rank and scale)."""
    align = _lora_model(0, r=2, alpha=8)
    align.save_pretrained(tmp_path / "align")
    return tmp_path / "align", _safety(align), _lora_model(1, r=4, alpha=4)


def _run(model, align_dir, seed=0, **params):
    return Resta().repair(model, [], RestaParams(**params), seed=seed, align_adapter=align_dir)


def test_adds_the_scaled_safety_vector_exactly_at_rank_r2_plus_r1(pair):
    align_dir, v, ft = pair
    before = _by_hand(ft)
    report = _run(ft, align_dir, scale=0.7)
    assert report["edited"] == sorted(before) and report["n_modules"] == 4 == len(before)
    for name, m in _modules(ft).items():
        w, dw = before[name]
        np.testing.assert_allclose(_effective(ft)[name], w + dw + 0.7 * v[name], rtol=0, atol=1e-12)
        assert report["stored_rank"][name] == m.r["default"] == 4 + 2 and m.scaling["default"] == 1.0
        assert report["safety_over_finetune_norm"][name] == pytest.approx(
            np.linalg.norm(0.7 * v[name]) / np.linalg.norm(dw), rel=1e-5)
    # merged into the base, the model's weight is W_ft + scale * V
    merged = dict(ft.merge_and_unload().named_modules())
    for name, (w, dw) in before.items():
        np.testing.assert_allclose(merged[name].weight.detach().numpy(), w + dw + 0.7 * v[name], rtol=0, atol=1e-12)


def test_only_the_fine_tune_lora_changes(pair):
    align_dir, _, ft = pair
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in align_dir.iterdir()}
    base = {n: p.detach().clone() for n, p in ft.named_parameters() if "lora_" not in n}
    untargeted = {n: (m.lora_B["default"].weight.detach().clone(), m.lora_A["default"].weight.detach().clone())
                  for n, m in _modules(ft).items() if "v_proj" in n}
    report = _run(ft, align_dir, target_modules=["q_proj"])
    assert report["n_modules"] == report["n_edited"] == 2 and all("q_proj" in n for n in report["edited"])
    assert {n: p for n, p in ft.named_parameters() if "lora_" not in n}.keys() == base.keys()
    for n, p in ft.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    for n, (b, a) in untargeted.items():
        m = _modules(ft)[n]
        assert torch.equal(m.lora_B["default"].weight, b) and torch.equal(m.lora_A["default"].weight, a)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in align_dir.iterdir()} == files


def _mask(seed, name, shape, p):
    return (torch.rand(shape, generator=generator(seed, "resta-dare", name), dtype=torch.float64) >= p).numpy()


def test_dare_on_the_fine_tune_delta_drops_and_rescales_with_the_seeded_mask(pair):
    align_dir, v, ft = pair
    before = _by_hand(ft)
    report = _run(ft, align_dir, seed=3, drop_rate=0.3)
    fractions = []
    for name, m in _modules(ft).items():
        w, dw = before[name]
        keep = _mask(3, name, dw.shape, 0.3)
        new = _effective(ft)[name] - w
        np.testing.assert_allclose(new, np.where(keep, dw / 0.7, 0.0) + v[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose((new - v[name])[~keep], 0.0, atol=1e-12)  # dropped: the safety vector alone
        assert report["stored_rank"][name] == min(dw.shape) == m.r["default"]
        assert report["kept_fraction"][name] == pytest.approx(keep.mean(), abs=1e-6)
        fractions.append(keep.mean())
    assert abs(np.mean(fractions) - 0.7) < 0.05 and report["drop_on"] == "finetune" and report["rescale"] is True


def test_dare_is_deterministic_per_seed(tmp_path, pair):
    align_dir, _, _ = pair
    runs = {}
    for label, seed in [("a", 5), ("b", 5), ("c", 6)]:
        ft = _lora_model(1, r=4, alpha=4)
        _run(ft, align_dir, seed=seed, drop_rate=0.5)
        runs[label] = _effective(ft)
    for name in runs["a"]:
        np.testing.assert_array_equal(runs["a"][name], runs["b"][name])
        assert not np.allclose(runs["a"][name], runs["c"][name])


def test_dare_on_the_safety_vector_without_rescale(pair):
    align_dir, v, ft = pair
    before = _by_hand(ft)
    _run(ft, align_dir, seed=1, scale=2.0, drop_rate=0.6, drop_on="safety", rescale=False)
    for name in _modules(ft):
        w, dw = before[name]
        keep = _mask(1, name, dw.shape, 0.6)
        np.testing.assert_allclose(_effective(ft)[name], w + dw + 2.0 * np.where(keep, v[name], 0.0), rtol=0, atol=1e-12)


def test_modules_without_the_other_lora_are_reported(tmp_path):
    align = _lora_model(0, r=2, alpha=8, targets=("q_proj", "k_proj"))
    align.save_pretrained(tmp_path / "align")
    ft = _lora_model(1, r=4, alpha=4, targets=("q_proj", "v_proj"))
    before = _by_hand(ft)
    report = _run(ft, tmp_path / "align")
    v_names = [n for n in before if "v_proj" in n]
    assert report["no_alignment_lora"] == report["untouched"] == sorted(v_names)
    assert report["alignment_without_finetune_lora"] == sorted(n for n in _safety(align) if "k_proj" in n)
    for n in v_names:  # V = 0 there: unchanged, at rank 4
        # W + s B A recomputed: the same factors, but the matmul kernel may round differently (seen at 1e-15 on Zen 5)
        np.testing.assert_allclose(_effective(ft)[n], before[n][0] + before[n][1], rtol=0, atol=1e-12)
        assert _modules(ft)[n].r["default"] == 4


@pytest.mark.parametrize("params", [{"scale": 0.5}, {"drop_rate": 0.4}, {"drop_rate": 0.4, "drop_on": "safety"}])
def test_the_saved_adapter_loads_back_to_the_edited_weights(pair, tmp_path, params):
    from peft import PeftModel

    align_dir, _, ft = pair
    _run(ft, align_dir, **params)
    edited = _effective(ft)
    ft.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"]) == set(edited)
    reloaded = PeftModel.from_pretrained(make_model("llama", dtype=torch.float64, seed=0), str(tmp_path / "adapter"))
    for name, w in _effective(reloaded).items():
        np.testing.assert_allclose(w, edited[name], rtol=0, atol=1e-12)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ft(input_ids=ids).logits)


def test_it_needs_two_lora_and_an_alignment_adapter(pair, tmp_path):
    align_dir, _, ft = pair
    with pytest.raises(ValueError, match="finetune.topology=two-lora"):
        Resta().repair(ft, [], RestaParams(), seed=0, align_adapter=align_dir, topology="single-lora")
    with pytest.raises(ValueError, match="an alignment that trains a LoRA"):
        Resta().repair(ft, [], RestaParams(), seed=0, align_adapter=tmp_path / "missing")


def test_end_to_end(make_cfg):
    cfg = make_cfg("repair.method=resta", "repair.params.drop_rate=0.5")
    metrics = stages.run(cfg)
    report = json.loads((stages.stage_dirs(cfg)["repair"] / "stage.json").read_text())["report"]
    assert report["n_edited"] == report["n_modules"] == 4 and "harmful_score/keyword" in metrics
    assert set(report["kept_fraction"]) == set(report["edited"])


def test_params_at_their_defaults_round_trip():
    """A resolved config (a sweep's) dumps every field, defaults included: that must validate again."""
    from alignshield.repair.resta import RestaParams

    assert RestaParams(**RestaParams().model_dump()) == RestaParams()
