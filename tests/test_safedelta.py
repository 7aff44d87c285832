"""Safe Delta (repair): each part of the reference's rule against an independent computation (the OBS
diagonal, the greedy selection, the compensation as a constrained least-squares optimum, the H of the
aligned model's inputs), the extremes, bad configs, end to end."""

import json
import random

import pytest
import torch

from alignshield import stages
from alignshield.data.collate import Tokenized
from alignshield.repair.safedelta import SafeDelta, SafeDeltaParams, block_mask, safe_delta, upper_inverse_cholesky
from conftest import random_lora_model


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / n


def _pair(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, w + 0.1 * torch.randn(rows, cols, generator=g, dtype=torch.float64)


def test_the_safety_cost_is_the_obs_diagonal():
    """d_m^2 = [(H restricted to columns m..)^-1]_00: the OBS saliency denominator once the columns
    before m are fixed (SparseGPT), here from the upper Cholesky factor of H^-1."""
    h = _spd(7, 0)
    u = upper_inverse_cholesky(h, percdamp=0.0)
    for m in range(7):
        assert u[m, m] ** 2 == pytest.approx(float(torch.linalg.inv(h[m:, m:])[0, 0]), rel=1e-10)
    damped = upper_inverse_cholesky(h, percdamp=0.5)
    h_damped = h + 0.5 * torch.diag(h).mean() * torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(damped.T @ damped, torch.linalg.inv(h_damped))


def reference_selection(w, w_ft, d, scale, rows, exclude):
    """safedelta_runner.py adjust_delta, element by element in plain Python: order by the column's
    1/d^2 (ties: row-major position), drop the top share, take while the running loss fits the budget
    mean(1/d^2) * s/2 * rows/4096."""
    r, c = w.shape
    elements = sorted(((1 / float(d[m]) ** 2, i * c + m) for i in range(r) for m in range(c)))
    elements = elements[: len(elements) - int(exclude * len(elements))]
    budget = sum(1 / float(d[m]) ** 2 for m in range(c)) / c * scale / 2 * rows / 4096
    taken, running = set(), 0.0
    for _, flat in elements:
        i, m = divmod(flat, c)
        running += float(w_ft[i, m] - w[i, m]) ** 2 / float(d[m]) ** 2
        if running <= budget:
            taken.add((i, m))
    return taken


@pytest.mark.parametrize("exclude", [0.0, 0.15, 0.5])
def test_the_selection_is_the_reference_rule(exclude):
    w, w_ft = _pair(5, 8, 1)
    d = torch.diag(upper_inverse_cholesky(_spd(8, 2), 0.01))
    cost, loss = 1 / d ** 2, (w_ft - w) ** 2 / d ** 2
    scale = 2 * 4096 / 5 * float(loss.sum()) / 3 / float(cost.mean())  # about a third of the loss fits
    mask = block_mask(w, w_ft, d, scale, rows=5, exclude_fraction=exclude)
    expected = reference_selection(w, w_ft, d, scale, 5, exclude)
    assert {(i, m) for i, m in mask.nonzero().tolist()} == expected
    assert 0 < len(expected) < w.numel()


@pytest.mark.parametrize("blocksize, sub_block", [(64, 1), (2, 1), (3, 1)])
def test_the_compensation_is_the_least_squares_optimum(blocksize, sub_block):
    """With the first k columns taking the fine-tuned values and the rest free, the result minimises
    the output change on the safety data, tr((W_new - W) H (W_new - W)^T): the free columns get
    -(W_ft - W)_taken H_taken,free H_free,free^-1 (closed form). Exact column by column (sub_block=1);
    the reference's sub-blocks of 4 skip the updates inside a sub-block, an approximation."""
    w, w_ft = _pair(3, 8, 3)
    h, k = _spd(8, 4), 4
    masks = []
    for i1 in range(0, 8, blocksize):
        cols = torch.arange(i1, min(i1 + blocksize, 8))
        masks.append((cols < k).expand(3, -1))
    params = SafeDeltaParams(percdamp=0.0, blocksize=blocksize, sub_block=sub_block)
    new, taken = safe_delta(w, w_ft, h, params, masks=masks)
    delta_taken = (w_ft - w)[:, :k]
    free = -delta_taken @ h[:k, k:] @ torch.linalg.inv(h[k:, k:])
    torch.testing.assert_close(new[:, :k], w_ft[:, :k])
    torch.testing.assert_close(new[:, k:] - w[:, k:], free)
    assert int(taken.sum()) == 3 * k
    lazy, _ = safe_delta(w, w_ft, h, params.model_copy(update={"sub_block": 4}), masks=masks)
    assert not torch.allclose(lazy, new)  # the reference's approximation is not the optimum


def test_the_extremes_keep_all_or_nothing_of_the_update():
    w, w_ft = _pair(4, 6, 5)
    h = _spd(6, 6)
    everything = safe_delta(w, w_ft, h, SafeDeltaParams(scale=1e12, exclude_fraction=0.0))[0]
    torch.testing.assert_close(everything, w_ft)
    nothing, taken = safe_delta(w, w_ft, h, SafeDeltaParams(scale=0.0))
    assert not taken.any()
    torch.testing.assert_close(nothing, w)


def _lora_model(seed=0):
    return random_lora_model(seed, scale=0.05)


def test_the_repair_uses_the_aligned_models_inputs_and_stores_the_result_exactly():
    model = _lora_model()
    rng = random.Random(0)
    safety = [Tokenized(input_ids=[rng.randrange(3, 300) for _ in range(rng.randrange(4, 12))], labels=[])
              for _ in range(10)]
    inner = model.base_model.model
    targets = {n: m for n, m in inner.named_modules() if hasattr(m, "lora_A")}
    before = {n: (m.base_layer.weight.detach().clone(),
                  m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach())
              for n, m in targets.items()}
    # independently: each example alone, unpadded, through the model WITHOUT the fine-tune adapter;
    # q_proj and v_proj read the input layer norm of the layer's input hidden state
    width = inner.config.hidden_size
    h = {n: torch.zeros(width, width, dtype=torch.float64) for n in targets}
    with torch.no_grad(), model.disable_adapter():
        for ex in safety:
            states = inner(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states
            for n in targets:
                layer = int(n.split(".layers.")[1].split(".")[0])
                x = inner.model.layers[layer].input_layernorm(states[layer])[0]
                h[n] += 2 * x.T @ x / len(safety)
    params = SafeDeltaParams(scale=5e4, n_safety=10, batch_size=4)
    report = SafeDelta().repair(model, [], params, seed=0, pad_token_id=0, safety=safety)
    assert report["n_safety"] == 10 and report["n_modules"] == 4 and 0 < report["taken_fraction"] < 1
    for n, m in targets.items():
        w, delta = before[n]
        expected, _ = safe_delta(w, w + delta, h[n], params)
        stored = m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
        torch.testing.assert_close(m.base_layer.weight, w)  # the base is untouched: the result is the adapter
        torch.testing.assert_close(stored, expected - w, rtol=1e-4, atol=1e-7)  # H: float32 products


def test_end_to_end(make_cfg):
    cfg = make_cfg("repair.method=safedelta", "repair.params.n_safety=4")
    metrics = stages.run(cfg)
    report = json.loads((stages.stage_dirs(cfg)["repair"] / "stage.json").read_text())["report"]
    assert report["n_safety"] == 4 and report["n_modules"] == 4 and "harmful_score/keyword" in metrics
