"""Antidote and its pruning ablations: scores against a brute-force computation, exact per-row counts,
padding invariance, seeds, errors, the merged mode's exact storage, and the repair stage end to end.

The defaults (``targets=adapter``, ``rounding=reference``) are checked against this file's own
re-implementation of the reference's mask (git-disl/Antidote ``utils.py:prune_wanda_outlier``); the
former defaults (``targets=qkv``, ``rounding=floor``) against a re-implementation of the old rule."""

import json
import math
from fractions import Fraction

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
from alignshield.models.lora import find_targets
from alignshield.repair.prune import PruneParams, per_row_k, zero_top_k_per_row
from conftest import make_model, tiny_config

PRUNED = ("q_proj", "k_proj", "v_proj")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("antidote", "random-prune", "magnitude-prune")
OLD = {"targets": "qkv", "rounding": "floor"}  # the former defaults, requested explicitly


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
    """The former rule's selection: the k highest of each row, equal scores to the earlier column."""
    mask = np.zeros(score.shape, dtype=bool)
    for row in range(score.shape[0]):
        mask[row, np.argsort(-score[row], kind="stable")[:k]] = True
    return mask


def _old_mask(score: np.ndarray, alpha: float) -> np.ndarray:
    """The former default rule, re-implemented: k = floor(alpha * in) with alpha as written."""
    return _top_k_mask(score, math.floor(Fraction(str(alpha)) * score.shape[1]))


def _reference_count(alpha: float, n: int) -> int:
    """utils.py:711,722 of the reference: it keeps int(n * (1 - dense_ratio)) per row, zeroes the rest."""
    return n - int(n * (1 - alpha))


def _reference_mask(score: np.ndarray, alpha: float) -> np.ndarray:
    """The reference's mask (utils.py:713-723) written out: start from all ones, sort each row ascending
    (stable) and set the first int(n * (1 - alpha)) to 0; train.py:535 then zeroes where it is 1."""
    keep = int(score.shape[1] * (1 - alpha))
    mask = np.ones(score.shape, dtype=bool)
    for row in range(score.shape[0]):
        mask[row, np.argsort(score[row], kind="stable")[:keep]] = False
    return mask


def _lora_linears(model) -> dict:
    """Every LoRA factor of the (single) adapter, by its name in the base model."""
    return {n: m for n, m in model.get_base_model().named_modules()
            if n.endswith((".lora_A.default", ".lora_B.default"))}


def _hooked_scores(model, calibration) -> dict[str, np.ndarray]:
    """Wanda scores |W| * sqrt(mean x^2) of every LoRA factor, from this test's own forward hooks, one
    unpadded example at a time through the whole model (independent of ``collect_input_stats``)."""
    linears = _lora_linears(model)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    tokens = 0

    def hook(name):
        def add(module, args, out):  # returns None: the output is left alone
            sums[name].add_(args[0].reshape(-1, module.in_features).double().pow(2).sum(0))
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    model.eval()
    with torch.no_grad():
        for t in calibration:
            model(input_ids=torch.tensor([t.input_ids]))
            tokens += len(t.input_ids)
    for h in handles:
        h.remove()
    return {n: (m.weight.detach().double().abs() * (sums[n] / tokens).sqrt()).numpy() for n, m in linears.items()}


def _zeroed(model) -> dict[str, np.ndarray]:
    return {n: (m.weight.detach() == 0).numpy() for n, m in _lora_linears(model).items()}


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

    report = _repair("antidote", model, calibration, tokenizer, alpha=0.25, batch_size=4, **OLD)
    for (name, which), w in weights.items():
        k = per_row_k(0.25, w.shape[1], "floor")
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
        k = per_row_k(0.1, deltas[t.name].shape[1], "floor")
        expected[t.name] = deltas[t.name] * torch.from_numpy(~_top_k_mask(score.numpy(), k))

    report = _repair("antidote", model, calibration, tokenizer, score="merged", **OLD)
    for t in targets:
        out_f, in_f = deltas[t.name].shape
        assert report["modules"][t.name]["stored_rank"] == min(out_f, in_f) and t.module.scaling["default"] == 1.0
        torch.testing.assert_close(t.module.get_delta_weight("default"), expected[t.name], rtol=0, atol=1e-12)
        assert ((t.module.get_delta_weight("default") == 0).sum(1) == per_row_k(0.1, in_f, "floor")).all()
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


# (options, pruned projections, rounding, k for a 32-wide lora_A row, k for a rank-4 lora_B row) at alpha 0.3
K_CASES = {"old": (OLD, PRUNED, "floor", 9, 1),                       # floor(9.6), floor(1.2)
           "default": ({}, (*PRUNED, "o_proj"), "reference", 10, 2)}   # 32 - int(22.4), 4 - int(2.8)


@pytest.mark.parametrize("case", sorted(K_CASES))
@pytest.mark.parametrize("method", METHODS)
def test_exactly_k_per_row_zeroed_and_nothing_else_changes(method, case, tokenizer):
    options, pruned_projections, rounding, k_a, k_b = K_CASES[case]
    model = _model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    report = _repair(method, model, _calibration(tokenizer), tokenizer, alpha=0.3, **options)
    after = model.state_dict()
    pruned = 0
    for name, old in before.items():
        new = after[name]
        if "lora_" in name and any(f".{p}." in name for p in pruned_projections):
            k = per_row_k(0.3, old.shape[1], rounding)
            changed = new != old
            assert (new[changed] == 0).all()
            assert ((new == 0).sum(1) == k).all() and (old != 0).all()
            pruned += changed.sum().item()
        else:  # base weights, o_proj's LoRA under targets=qkv, norms, embeddings
            assert torch.equal(new, old), name
    assert report["method"] == method and report["total_zeroed"] == pruned
    assert set(report["modules"]) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in pruned_projections}
    entry = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["lora_A"]["k"] == per_row_k(0.3, 32, rounding) == k_a
    assert entry["lora_B"]["k"] == per_row_k(0.3, 4, rounding) == k_b
    assert entry["lora_A"]["fraction_zeroed"] == pytest.approx(k_a / 32, abs=1e-6)
    assert report["rounding"] == rounding
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
    assert per_row_k(0.1, 576, "floor") == 57 and per_row_k(0.29, 100, "floor") == 29
    assert per_row_k(0.1, 8, "floor") == 0
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = zero_top_k_per_row(w, torch.tensor([[0.0, 9.0, 9.0, 1.0], [3.0, 2.0, 1.0, 0.0]]), 2, "floor")
    assert w.tolist() == [[1.0, 0.0, 0.0, 4.0], [0.0, 0.0, 7.0, 8.0]] and mask.sum() == 4
    with pytest.raises(ValueError, match="unknown rounding"):
        per_row_k(0.1, 8, "ceil")
    # without a rule the helpers follow the default, the reference's
    assert per_row_k(0.1, 8) == per_row_k(0.1, 8, "reference") == 1 and per_row_k(0.1, 576) == 58
    w = torch.ones(1, 4)
    assert zero_top_k_per_row(w, torch.tensor([[0.0, 9.0, 9.0, 1.0]]), 1).tolist() == [[False, False, True, False]]


# hand-made r = 8 rows (ties: 7.0 at columns 3 and 5 of row 0, all equal in row 2)
SCORES_R8 = np.array([[0.5, 3.0, 1.0, 7.0, 2.0, 7.0, 0.0, 4.0],
                      [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])


@pytest.mark.parametrize("alpha, count, zeroed_columns", [
    (0.01, 1, [[5], [0], [7]]),       # 8 - int(7.92): one per row even at alpha = 0.01
    (0.1, 1, [[5], [0], [7]]),        # 8 - int(7.2)
    (0.2, 2, [[3, 5], [0, 1], [6, 7]]),  # 8 - int(6.4)
])
def test_reference_rounding_matches_the_reference_mask_on_hand_made_scores(alpha, count, zeroed_columns):
    assert per_row_k(alpha, 8, "reference") == _reference_count(alpha, 8) == count
    expected = _reference_mask(SCORES_R8, alpha)
    assert [list(np.flatnonzero(row)) for row in expected] == zeroed_columns  # the re-implementation itself
    w = torch.arange(1.0, 25.0, dtype=torch.float64).reshape(3, 8)
    mask = zero_top_k_per_row(w, torch.from_numpy(SCORES_R8), per_row_k(alpha, 8, "reference"), "reference")
    assert np.array_equal(mask.numpy(), expected) and np.array_equal(w.numpy() == 0, expected)
    # the former rule on the same rows: nothing below alpha = 0.125, ties to the earlier column
    old = zero_top_k_per_row(torch.ones(3, 8), torch.from_numpy(SCORES_R8), per_row_k(alpha, 8, "floor"), "floor")
    assert np.array_equal(old.numpy(), _old_mask(SCORES_R8, alpha))
    assert int(old.sum()) == (0 if alpha < 0.125 else 3)


def test_reference_rounding_keeps_the_float_arithmetic():
    # 90 * (1 - 0.3) = 62.99999999999999 in floats: the reference keeps 62 and zeroes 28 (exactly: 27)
    assert per_row_k(0.3, 90, "reference") == _reference_count(0.3, 90) == 28
    assert per_row_k(0.3, 90, "floor") == 27
    for alpha in (0.01, 0.05, 0.07, 0.1, 0.2, 0.25, 0.3, 0.5, 0.99):
        for n in (1, 4, 8, 32, 90, 256, 500, 576, 1536, 4096):
            assert per_row_k(alpha, n, "reference") == _reference_count(alpha, n), (alpha, n)
    g = np.random.default_rng(0)
    for alpha, n in ((0.3, 90), (0.07, 500), (0.1, 576), (0.05, 8)):
        score = g.random((5, n))
        score[:, :3] = 0.25  # some exact ties
        mask = zero_top_k_per_row(torch.zeros(5, n, dtype=torch.float64), torch.from_numpy(score),
                                  per_row_k(alpha, n, "reference"), "reference")
        assert np.array_equal(mask.numpy(), _reference_mask(score, alpha)), (alpha, n)


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
    report = _repair(method, model, _calibration(tokenizer), tokenizer, targets="qkv")
    assert report["unmatched_targets"] == ["k_proj"] and len(report["modules"]) == 4
    report = _repair(method, _model(targets=("q_proj", "v_proj")), _calibration(tokenizer), tokenizer)
    assert report["unmatched_targets"] == [] and len(report["modules"]) == 4  # the whole adapter


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
    assert (p.alpha, p.n_calibration, p.targets, p.target_modules, p.rounding, p.score) == (
        0.1, 2000, "adapter", None, "reference", "factors")
    assert issubclass(AntidoteParams, PruneParams) and "2408.09600" in PruneParams.__doc__
    assert "bad_sample_num" in AntidoteParams.__doc__
    for method in METHODS:
        assert (_params(method).targets, _params(method).rounding) == ("adapter", "reference")


@pytest.mark.parametrize("method", METHODS)
def test_option_values_are_config_errors(method):
    for key, bad in (("targets", "all"), ("rounding", "ceil"), ("target_modules", [])):
        with pytest.raises(ConfigError, match=rf"repair\.params\.{key}"):
            RepairConfig(method=method, params={key: bad}).resolved_params(REPAIR_METHODS)
    with pytest.raises(ConfigError, match="either targets or target_modules"):
        RepairConfig(method=method, params={"targets": "qkv", "target_modules": ["q_proj"]}).resolved_params(REPAIR_METHODS)


# ----------------------------------------------------------------------------------- defaults = the reference


@pytest.mark.parametrize("method", METHODS)
def test_default_targets_every_lora_module_of_the_adapter(method, tokenizer):
    model = _model(targets=ALL7, r=8)
    lora_modules = {n.rsplit(".", 2)[0] for n in _lora_linears(model)}
    assert len(lora_modules) == 2 * 7
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    report = _repair(method, model, _calibration(tokenizer), tokenizer)
    assert set(report["modules"]) == lora_modules
    assert (report["targets"], report["target_modules"], report["unmatched_targets"]) == ("adapter", None, [])
    assert report["pruned_module_types"] == sorted(ALL7) and report["n_pruned_modules"] == 14
    assert report["matrices_with_k_zero"] == 0
    after = model.state_dict()
    for name, old in before.items():
        if "lora_" in name:  # every factor of every LoRA module, the reference's count in every row
            assert ((after[name] == 0).sum(1) == _reference_count(0.1, old.shape[1])).all(), name
        else:
            assert torch.equal(after[name], old), name
    assert report["total_weights"] == sum(p.numel() for n, p in before.items() if "lora_" in n)


def test_adapter_equals_qkv_on_the_references_adapter_layout(tokenizer):
    """The reference's fine-tune LoRA sits on q/k/v only (train.py:266-270): there the two agree."""
    masks = {}
    for targets in ("adapter", "qkv"):
        model = _model(targets=PRUNED, r=8)
        _repair("antidote", model, _calibration(tokenizer), tokenizer, targets=targets)
        masks[targets] = _zeroed(model)
    assert masks["adapter"].keys() == masks["qkv"].keys()
    assert all(np.array_equal(masks["adapter"][n], masks["qkv"][n]) for n in masks["adapter"])


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.2])
def test_default_antidote_masks_equal_the_reference_rule(alpha, tokenizer):
    """r = 8 LoRA on all seven projections: every factor's mask is the reference's mask of this test's own
    Wanda scores; at r = 8 each lora_B row loses 1 entry (alpha 0.01, 0.1) or 2 (0.2)."""
    model, calibration = _model(targets=ALL7, r=8), _calibration(tokenizer)
    scores = _hooked_scores(model, calibration)
    report = _repair("antidote", model, calibration, tokenizer, alpha=alpha, batch_size=4)
    zeroed = _zeroed(model)
    assert zeroed.keys() == scores.keys() and len(scores) == 2 * 7 * 2
    for name, score in scores.items():
        assert np.array_equal(zeroed[name], _reference_mask(score, alpha)), name
        if ".lora_B." in name:
            assert (zeroed[name].sum(1) == (2 if alpha == 0.2 else 1)).all()
    assert report["rounding"] == "reference" and report["targets"] == "adapter"
    assert report["total_zeroed"] == sum(int(z.sum()) for z in zeroed.values())


@pytest.mark.parametrize("alpha", [0.1, 0.25])
def test_qkv_and_floor_reproduce_the_old_masks(alpha, tokenizer):
    """targets=qkv, rounding=floor: the former defaults' masks, from a re-implementation of the old rule;
    o_proj and the MLP stay untouched, and at alpha = 0.1 (floor(0.8) = 0) so does every lora_B."""
    model, calibration = _model(targets=ALL7, r=8), _calibration(tokenizer)
    scores = _hooked_scores(model, calibration)
    report = _repair("antidote", model, calibration, tokenizer, alpha=alpha, **OLD)
    zeroed = _zeroed(model)
    for name, score in scores.items():
        if any(f".{p}." in name for p in PRUNED):
            assert np.array_equal(zeroed[name], _old_mask(score, alpha)), name
        else:
            assert not zeroed[name].any(), name
    assert (report["targets"], report["target_modules"]) == ("qkv", list(PRUNED))
    assert report["matrices_with_k_zero"] == (2 * 3 if alpha == 0.1 else 0)
    # the ablations under the same options: same old rule on their own scores
    mag = _model(targets=ALL7, r=8)
    weights = {n: np.abs(m.weight.detach().numpy()) for n, m in _lora_linears(mag).items()}
    _repair("magnitude-prune", mag, [], tokenizer, alpha=alpha, **OLD)
    for name, z in _zeroed(mag).items():
        expected = _old_mask(weights[name], alpha) if any(f".{p}." in name for p in PRUNED) else np.zeros_like(z)
        assert np.array_equal(z, expected), name


def test_report_names_the_targets_and_the_rounding(tokenizer):
    default = _repair("antidote", _model(), _calibration(tokenizer), tokenizer)
    assert (default["targets"], default["rounding"]) == ("adapter", "reference")
    assert "in_features - int(in_features * (1 - alpha))" in default["k_rule"]
    old = _repair("antidote", _model(), _calibration(tokenizer), tokenizer, **OLD)
    assert (old["targets"], old["rounding"]) == ("qkv", "floor") and old["k_rule"].startswith("floor(alpha * in_features)")
    custom = _repair("magnitude-prune", _model(), [], tokenizer, target_modules=["o_proj"], rounding="floor")
    assert (custom["targets"], custom["target_modules"], custom["pruned_module_types"]) == ("target_modules", ["o_proj"], ["o_proj"])
    merged = _repair("antidote", _model(), _calibration(tokenizer), tokenizer, score="merged")
    assert (merged["targets"], merged["rounding"]) == ("adapter", "reference") and "int(" in merged["k_rule"]
    json.dumps([default, old, custom, merged])


def test_smollm2_shaped_adapter_counts():
    """One layer of SmolLM2-135M's shapes (hidden 576, kv width 192, MLP 1536) with the embedded default's
    fine-tune LoRA (r = 8, seven projections); times its 30 layers: old defaults 41,040 zeroed of
    2,442,240 adapter weights at alpha = 0.1, new defaults 276,000."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", layers=1, hidden=576)
    config.update(dict(intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64))
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config), LoraSettings(r=8, alpha=16, target_modules=list(ALL7)))
    counts = {}
    for case, options in (("new", {}), ("old", OLD)):
        with torch.no_grad():  # distinct magnitudes (B is zero at init)
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        report = REPAIR_METHODS.get("magnitude-prune")().repair(model, [], _params("magnitude-prune", alpha=0.1, **options), seed=0)
        counts[case] = (30 * report["total_zeroed"], 30 * sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))
    # by hand: lora_A rows 6 x 8 of 576 and 8 of 1536; lora_B rows 576*3 + 192*2 + 1536*2 = 5184 of length 8
    new = 30 * (6 * 8 * (576 - int(576 * 0.9)) + 8 * (1536 - int(1536 * 0.9)) + 5184 * (8 - int(8 * 0.9)))
    assert counts["new"] == (new, 2_442_240) and new == 276_000
    assert counts["old"] == (41_040, 2_442_240) == (30 * 3 * 8 * 57, 2_442_240)


# ----------------------------------------------------------------------------------- the stage


def test_repair_stage_end_to_end(make_cfg):
    from safetensors.torch import load_file

    cfg = make_cfg("repair.method=antidote", "repair.params.n_calibration=16", "repair.params.alpha=0.25",
                   "repair.params.targets=qkv")
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
    assert report["unmatched_targets"] == ["k_proj"] and report["targets"] == "qkv"
    before, after = load_file(finetune_file), load_file(repaired)
    assert before.keys() == after.keys()
    assert sum(int(((after[k] == 0) & (before[k] != 0)).sum()) for k in before) == report["total_zeroed"]
    assert json.loads((dirs["evaluate"] / "stages.json").read_text())["repair"] == str(dirs["repair"])
    assert "harmful_score/keyword" in metrics

    merged = make_cfg("repair.method=antidote", "repair.params.n_calibration=8", "repair.params.score=merged")
    assert "harmful_score/keyword" in stages.run(merged)  # the dense-rank adapter loads and evaluates
    config = json.loads((stages.stage_dirs(merged)["repair"] / "adapter" / "adapter_config.json").read_text())
    assert len(config["rank_pattern"]) == 4 and set(config["rank_pattern"].values()) == {16, 32}
    report = json.loads((stages.stage_dirs(merged)["repair"] / "stage.json").read_text())["report"]
    assert (report["targets"], report["rounding"], report["unmatched_targets"]) == ("adapter", "reference", [])


def test_antidote_preset_uses_the_reference_max_length():
    """git-disl/Antidote: model_max_length defaults to 2048 (train.py:59-62) and no script used by the
    preset overrides it; the repair's calibration pairs are tokenized with finetune.train.max_length."""
    from alignshield.config import load_config

    a = load_config(preset="antidote-llama2")
    assert (a.align.train.max_length, a.finetune.train.max_length) == (2048, 2048)
    params = stages.resolve(a).repair.params
    assert (params["targets"], params["rounding"], params["alpha"]) == ("adapter", "reference", 0.1)


# Every repair's bad settings: config errors naming the field, raised when the params resolve.
BAD_PARAMS = [
    ("safedelta", "repair.params.scale=-1", "repair.params.scale"),
    ("safedelta", "repair.params.exclude_fraction=1", "repair.params.exclude_fraction"),
    ("safedelta", "repair.params.s=0.1", "repair.params.s: unknown key"),
    ("safemerge", "repair.params.weights=[0.8,-0.2]", "both weights must be >= 0"),
    ("safemerge", "repair.params.threshold=2", "repair.params.threshold"),
    ("safemerge", "repair.params.weighting=[0.8,0.2]", "repair.params.weighting: unknown key"),
    ("resta", "repair.params.drop_rate=1", "repair.params.drop_rate"),
    ("resta", "repair.params.drop_rate=-0.1", "repair.params.drop_rate"),
    ("resta", "repair.params.scale=-1", "repair.params.scale"),
    ("resta", "repair.params.scale=inf", "repair.params.scale"),
    ("resta", "repair.params.drop_on=both", "repair.params.drop_on"),
    ("resta", "repair.params.rescale=false", "rescale only act with drop_rate > 0"),
    ("resta", "repair.params.drop_on=safety", "drop_on only act with drop_rate > 0"),
    ("resta", "repair.params.beta=0.5", "repair.params.beta: unknown key"),
    ("oneshot-patch", "repair.params.epochs=0", "repair.params.epochs"),
    ("oneshot-patch", "repair.params.epochs=1.5", "repair.params.epochs"),
    ("oneshot-patch", "repair.params.learning_rate=0", "repair.params.learning_rate"),
    ("oneshot-patch", "repair.params.learning_rate=-1e-5", "repair.params.learning_rate"),
    ("oneshot-patch", "repair.params.optimizer=adam", "repair.params.optimizer"),
    ("oneshot-patch", "repair.params.max_grad_norm=0", "repair.params.max_grad_norm"),
    ("oneshot-patch", "repair.params.prompt=", "repair.params.prompt"),
    ("oneshot-patch", "repair.params.lr=1e-4", "repair.params.lr: unknown key"),
]


@pytest.mark.parametrize("method, override, message", BAD_PARAMS)
def test_bad_repair_params_are_config_errors(method, override, message):
    from alignshield.config import load_config

    cfg = load_config(overrides=[f"repair.method={method}", override])
    with pytest.raises(ConfigError, match=message):
        cfg.repair.resolved_params(REPAIR_METHODS)


@pytest.mark.parametrize("extra, message", [
    (("align.method=none", "repair.method=safelora"), "repair.method=safelora reads the alignment LoRA"),
    (("align.method=none", "repair.method=safemerge"), "repair.method=safemerge reads the alignment LoRA"),
    (("align.method=none", "repair.method=resta"), "repair.method=resta reads the alignment LoRA"),
    (("finetune.topology=single-lora", "repair.method=safedelta"), "repair.method=safedelta compares the fine-tuned"),
    (("repair.method=oneshot-patch", "repair.params.epochs=0"), "repair.params.epochs"),
])
def test_bad_repair_configs_fail_before_any_compute(make_cfg, extra, message, monkeypatch):
    monkeypatch.setattr(stages, "_train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=message):
        stages.run(make_cfg(*extra))
