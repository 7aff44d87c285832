"""Antidote and its pruning ablations: scores against a brute-force computation, exact per-row counts,
padding invariance, seeds, errors, the merged mode's exact storage, and the repair stage end to end."""

import json

import numpy as np
import pytest
import torch

from alignshield import stages
from alignshield.config import ConfigError, LoraSettings, RepairConfig
from alignshield.data import Example
from alignshield.data.collate import tokenize_pair
from alignshield.models.lora import attach_lora
from alignshield.repair import REPAIR_METHODS
from alignshield.repair.antidote import AntidoteParams, antidote_scores, collect_input_stats
from alignshield.repair.prune import PruneParams, find_targets, per_row_k, zero_top_k_per_row
from conftest import make_model

PRUNED = ("q_proj", "k_proj", "v_proj")
METHODS = ("antidote", "random-prune", "magnitude-prune")


def _model(seed=0, targets=(*PRUNED, "o_proj"), r=4):
    """A tiny float64 Llama with a LoRA whose A and B are both random (B is zero at init)."""
    model = attach_lora(make_model("llama", layers=2, dtype=torch.float64, seed=seed),
                        LoraSettings(r=r, alpha=8, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model


def _calibration(tokenizer, n=6):
    answers = ["Sure, here is how to do it step by step.", "the quick brown fox", "It is illegal and harmful."]
    return [tokenize_pair(tokenizer, Example(f"question {'number ' * i}{i}", "", answers[i % 3]), "alpaca", 128)
            for i in range(n)]


def _params(method, **kw):
    return REPAIR_METHODS.get(method).Params(**kw)


def _repair(method, model, calibration, tokenizer, seed=0, **kw):
    return REPAIR_METHODS.get(method)().repair(model, calibration, _params(method, **kw), seed=seed,
                                               pad_token_id=tokenizer.eos_token_id)


def _brute_mean_sq(model, calibration):
    """Per (module, factor): mean over all tokens of x_j^2, the activations computed explicitly:
    one unpadded example at a time, the layer input = input_layernorm(hidden state entering the layer),
    the input of lora_B = that input times A^T."""
    base = model.get_base_model()
    sums, tokens = {}, 0
    with torch.no_grad():
        for t in calibration:
            ids = torch.tensor([t.input_ids])
            hidden = base(input_ids=ids, output_hidden_states=True).hidden_states
            assert torch.equal(hidden[0], base.model.embed_tokens(ids))  # hidden[i] enters layer i
            tokens += ids.shape[1]
            for i, layer in enumerate(base.model.layers):
                x = layer.input_layernorm(hidden[i])[0]
                for proj in PRUNED:
                    lin = getattr(layer.self_attn, proj)
                    name = f"model.layers.{i}.self_attn.{proj}"
                    a_out = x @ lin.lora_A["default"].weight.T
                    for key, act in (((name, "lora_A"), x), ((name, "lora_B"), a_out)):
                        sums[key] = sums.get(key, 0) + act.pow(2).sum(0)
    return {k: v / tokens for k, v in sums.items()}, tokens


def _top_k_mask(score: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(score.shape, dtype=bool)
    for row in range(score.shape[0]):
        mask[row, np.argsort(-score[row], kind="stable")[:k]] = True
    return mask


# ----------------------------------------------------------------------------------- scores


def test_factor_scores_equal_brute_force_and_top_k_are_zeroed(tokenizer):
    model, calibration = _model(), _calibration(tokenizer)
    targets, _ = find_targets(model, list(PRUNED))
    scores, tokens = antidote_scores(model, targets, calibration, "factors", batch_size=4,
                                     pad_token_id=tokenizer.eos_token_id)
    mean_sq, brute_tokens = _brute_mean_sq(model, calibration)
    assert tokens == brute_tokens and len(scores) == 2 * 3 * 2
    weights = {(t.name, w): t.factor(w).weight.detach().clone() for t in targets for w in ("lora_A", "lora_B")}
    for key, score in scores.items():
        expected = weights[key].abs() * mean_sq[key].sqrt()
        torch.testing.assert_close(score, expected, rtol=1e-10, atol=0)

    report = _repair("antidote", model, calibration, tokenizer, alpha=0.25, batch_size=4)
    for (name, which), w in weights.items():
        k = per_row_k(0.25, w.shape[1])
        expected_mask = _top_k_mask((w.abs() * mean_sq[(name, which)].sqrt()).numpy(), k)
        after = dict(model.get_base_model().named_modules())[name]
        zeroed = getattr(after, which)["default"].weight.detach().numpy() == 0
        assert (zeroed == expected_mask).all(), (name, which)
        assert report["modules"][name][which]["k"] == k
    assert report["n_calibration"] == 6 and report["calibration_tokens"] == tokens


def test_merged_scores_equal_brute_force_and_the_pruned_delta_is_stored_exactly(tokenizer, tmp_path):
    from peft import PeftModel

    model, calibration = _model(), _calibration(tokenizer)
    targets, _ = find_targets(model, list(PRUNED))
    mean_sq, _ = _brute_mean_sq(model, calibration)
    deltas = {t.name: t.module.get_delta_weight("default").detach().clone() for t in targets}
    scores, _ = antidote_scores(model, targets, calibration, "merged", 4, tokenizer.eos_token_id)
    expected = {}
    for t in targets:
        score = deltas[t.name].abs() * mean_sq[(t.name, "lora_A")].sqrt()
        torch.testing.assert_close(scores[(t.name, "delta")], score, rtol=1e-10, atol=0)
        k = per_row_k(0.1, deltas[t.name].shape[1])
        expected[t.name] = deltas[t.name] * torch.from_numpy(~_top_k_mask(score.numpy(), k))

    report = _repair("antidote", model, calibration, tokenizer, score="merged")
    for t in targets:
        out_f, in_f = deltas[t.name].shape
        assert report["modules"][t.name]["stored_rank"] == min(out_f, in_f) and t.module.scaling["default"] == 1.0
        torch.testing.assert_close(t.module.get_delta_weight("default"), expected[t.name], rtol=0, atol=1e-12)
        assert ((t.module.get_delta_weight("default") == 0).sum(1) == per_row_k(0.1, in_f)).all()
    # the saved adapter (per-module ranks in rank_pattern) loads and merges to the same weights
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model("llama", layers=2, dtype=torch.float64, seed=0),
                                         str(tmp_path / "adapter"))
    modules = dict(reloaded.get_base_model().named_modules())
    for t in targets:
        torch.testing.assert_close(modules[t.name].get_delta_weight("default"), expected[t.name], rtol=0, atol=1e-12)
    ids = torch.tensor([calibration[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_padding_does_not_change_the_statistics(tokenizer):
    model, calibration = _model(), _calibration(tokenizer)
    targets, _ = find_targets(model, list(PRUNED))
    modules = {(t.name, w): t.factor(w) for t in targets for w in ("lora_A", "lora_B")}
    unpadded = [{"input_ids": torch.tensor([t.input_ids]), "attention_mask": torch.ones(1, len(t.input_ids), dtype=torch.long)}
                for t in calibration]
    width = max(len(t.input_ids) for t in calibration) + 7
    ids = torch.randint(0, 300, (len(calibration), width), generator=torch.Generator().manual_seed(3))  # garbage pads
    mask = torch.zeros_like(ids)
    for i, t in enumerate(calibration):
        ids[i, : len(t.input_ids)] = torch.tensor(t.input_ids)
        mask[i, : len(t.input_ids)] = 1
    a = collect_input_stats(model, modules, unpadded)
    b = collect_input_stats(model, modules, [{"input_ids": ids, "attention_mask": mask}])
    for key in modules:
        assert a[key].tokens == b[key].tokens == int(mask.sum())
        torch.testing.assert_close(a[key].sum_sq, b[key].sum_sq, rtol=1e-12, atol=0)
    # through the method: batch size (hence padding) leaves the masks identical
    masks = []
    for bs in (1, 4):
        m = _model()
        _repair("antidote", m, calibration, tokenizer, batch_size=bs)
        masks.append({n: p == 0 for n, p in m.named_parameters() if "lora_" in n})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


# ----------------------------------------------------------------------------------- what changes


@pytest.mark.parametrize("method", METHODS)
def test_exactly_k_per_row_zeroed_and_nothing_else_changes(method, tokenizer):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    report = _repair(method, model, _calibration(tokenizer), tokenizer, alpha=0.3)
    after = model.state_dict()
    pruned = 0
    for name, old in before.items():
        new = after[name]
        if "lora_" in name and any(f".{p}." in name for p in PRUNED):
            k = per_row_k(0.3, old.shape[1])
            changed = new != old
            assert (new[changed] == 0).all()
            assert ((new == 0).sum(1) == k).all() and (old != 0).all()
            pruned += changed.sum().item()
        else:  # base weights, o_proj's LoRA, norms, embeddings
            assert torch.equal(new, old), name
    assert report["method"] == method and report["total_zeroed"] == pruned
    assert set(report["modules"]) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in PRUNED}
    entry = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["lora_A"]["k"] == per_row_k(0.3, 32) == 9 and entry["lora_B"]["k"] == per_row_k(0.3, 4) == 1
    assert entry["lora_A"]["fraction_zeroed"] == pytest.approx(9 / 32, abs=1e-6)
    json.dumps(report)


def test_ablations_reach_the_same_counts_as_antidote(tokenizer):
    reports = {m: _repair(m, _model(), _calibration(tokenizer), tokenizer, alpha=0.2) for m in METHODS}
    counts = {m: {(n, w): e[w]["zeroed"] for n, e in r["modules"].items() for w in e} for m, r in reports.items()}
    assert counts["antidote"] == counts["random-prune"] == counts["magnitude-prune"]
    assert len({r["total_zeroed"] for r in reports.values()}) == 1


def test_seeds_reproduce_masks(tokenizer):
    def mask(method, seed):
        model = _model()
        _repair(method, model, _calibration(tokenizer), tokenizer, seed=seed, alpha=0.5)
        return torch.cat([(p == 0).flatten() for n, p in model.named_parameters() if "lora_" in n])

    assert torch.equal(mask("random-prune", 1), mask("random-prune", 1))
    assert not torch.equal(mask("random-prune", 1), mask("random-prune", 2))
    assert torch.equal(mask("antidote", 1), mask("antidote", 2))  # no randomness in Antidote
    assert not torch.equal(mask("antidote", 1), mask("random-prune", 1))


def test_k_rule_and_the_shared_zeroing():
    assert per_row_k(0.1, 576) == 57 and per_row_k(0.29, 100) == 29 and per_row_k(0.1, 8) == 0
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = zero_top_k_per_row(w, torch.tensor([[0.0, 9.0, 9.0, 1.0], [3.0, 2.0, 1.0, 0.0]]), 2)
    assert w.tolist() == [[1.0, 0.0, 0.0, 4.0], [0.0, 0.0, 7.0, 8.0]] and mask.sum() == 4


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5])
@pytest.mark.parametrize("method", METHODS)
def test_alpha_outside_0_1_is_a_config_error(method, alpha):
    with pytest.raises(ConfigError, match=r"repair\.params\.alpha"):
        RepairConfig(method=method, params={"alpha": alpha}).resolved_params(REPAIR_METHODS)
    with pytest.raises(ConfigError, match=r"repair\.params\.score"):
        RepairConfig(method="antidote", params={"score": "dense"}).resolved_params(REPAIR_METHODS)
    with pytest.raises(ConfigError, match="unknown key"):
        RepairConfig(method="random-prune", params={"n_calibration": 3}).resolved_params(REPAIR_METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_missing_modules_error_names_what_the_adapter_has(method, tokenizer):
    model = _model(targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"has LoRA on: q_proj, v_proj"):
        _repair(method, model, _calibration(tokenizer), tokenizer, target_modules=["gate_proj", "up_proj"])
    # some names missing is fine: the ones present are pruned, the rest reported
    report = _repair(method, model, _calibration(tokenizer), tokenizer)
    assert report["unmatched_targets"] == ["k_proj"] and len(report["modules"]) == 4


def test_n_calibration_is_clipped_to_the_pool_and_reported(tokenizer):
    report = _repair("antidote", _model(), _calibration(tokenizer, 3), tokenizer, n_calibration=100)
    assert (report["n_calibration"], report["n_calibration_requested"]) == (3, 100)
    first_two = _repair("antidote", _model(), _calibration(tokenizer, 3), tokenizer, n_calibration=2)
    assert first_two["n_calibration"] == 2 and first_two["calibration_tokens"] < report["calibration_tokens"]


def test_empty_calibration_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="calibration set is empty"):
        _repair("antidote", _model(), [], tokenizer)


def test_params_document_the_paper_defaults():
    p = AntidoteParams()
    assert (p.alpha, p.n_calibration, p.target_modules, p.score) == (0.1, 2000, ["q_proj", "k_proj", "v_proj"], "factors")
    assert issubclass(AntidoteParams, PruneParams) and "2408.09600" in PruneParams.__doc__
    assert "bad_sample_num" in AntidoteParams.__doc__


# ----------------------------------------------------------------------------------- the stage


def test_repair_stage_end_to_end(make_cfg):
    from safetensors.torch import load_file

    cfg = make_cfg("repair.method=antidote", "repair.params.n_calibration=16", "repair.params.alpha=0.25")
    finetune_file = stages.finetune(cfg) / "adapter" / "adapter_model.safetensors"
    original = finetune_file.read_bytes()
    metrics = stages.run(cfg)
    dirs = stages.stage_dirs(cfg)
    assert finetune_file.read_bytes() == original  # the fine-tune adapter is never modified
    repaired = dirs["repair"] / "adapter" / "adapter_model.safetensors"
    assert repaired.exists() and not dirs["repair"].with_name(dirs["repair"].name + ".partial").exists()
    info = json.loads((dirs["repair"] / "stage.json").read_text())
    report = info["report"]
    assert info["method"] == "antidote" and info["params"]["alpha"] == 0.25
    assert report["n_calibration"] == 16 and report["seconds"] >= 0 and report["total_zeroed"] > 0
    assert report["unmatched_targets"] == ["k_proj"]
    before, after = load_file(finetune_file), load_file(repaired)
    assert before.keys() == after.keys()
    assert sum(int(((after[k] == 0) & (before[k] != 0)).sum()) for k in before) == report["total_zeroed"]
    assert json.loads((dirs["evaluate"] / "stages.json").read_text())["repair"] == str(dirs["repair"])
    assert "harmful_score/keyword" in metrics

    merged = make_cfg("repair.method=antidote", "repair.params.n_calibration=8", "repair.params.score=merged")
    assert "harmful_score/keyword" in stages.run(merged)  # the dense-rank adapter loads and evaluates
    config = json.loads((stages.stage_dirs(merged)["repair"] / "adapter" / "adapter_config.json").read_text())
    assert len(config["rank_pattern"]) == 4 and set(config["rank_pattern"].values()) == {16, 32}
