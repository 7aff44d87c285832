"""benchmarks/align_cost.py and repair_cost.py: their planning, and what they give AsFT and SafeMERGE
(the alignment LoRA as the stages give it), on a tiny model."""

import sys
from pathlib import Path

import pytest
import torch

from alignshield.config import AlignTrain, LoraSettings, ModelConfig
from alignshield.data import Example
from alignshield.data.collate import tokenize_pair
from alignshield.models.lora import attach_lora
from alignshield.repair.safelora import alignment_lora
from conftest import make_model

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _align_cost_worker
    import align_cost
    import repair_cost

    yield align_cost, _align_cost_worker, repair_cost
    for name in ("align_cost", "_align_cost_worker", "_align_cost_rows", "repair_cost"):
        sys.modules.pop(name, None)


def test_align_cost_plans_asft_and_its_alignment_steps(bench):
    align_cost = bench[0]
    ap = align_cost._parser()
    plan = align_cost.make_plan(ap, ap.parse_args(["--methods", "baselines"]))
    assert "asft" in plan.methods and plan.methods[0] == "sft"
    plan = align_cost.make_plan(ap, ap.parse_args(["--methods", "sft,asft", "--align-steps", "3"]))
    assert plan.methods == ["sft", "asft"] and plan.base["align_steps"] == 3
    with pytest.raises(SystemExit):
        align_cost.make_plan(ap, ap.parse_args(["--methods", "asft", "--align-steps", "0"]))


def test_asft_gets_a_trained_merged_alignment_lora_and_a_fresh_one(bench, tokenizer, tmp_path):
    """As stages.finetune: LoRA #1 trained and saved, the base with it merged, a fresh LoRA #2; AsFT
    anchors every module of it."""
    from alignshield.finetune.asft import AsFTParams, AsFTTrainer

    worker = bench[1]
    data = [tokenize_pair(tokenizer, Example(f"question {i}", "", "I cannot help."), "alpaca", 32) for i in range(8)]
    base = {k: v.clone() for k, v in make_model(dtype=torch.float64).state_dict().items()}
    built = worker.Built(attach_lora(make_model(dtype=torch.float64), LORA), data, data, tokenizer.eos_token_id,
                         ModelConfig(name="tiny"), AlignTrain(batch_size=4, max_length=32), 0, {}, LORA)
    adapter = tmp_path / "align-adapter"
    worker.train_alignment_lora(built, 1, adapter)
    scale, factors = alignment_lora(adapter)
    assert len(factors) == 6 and all(torch.count_nonzero(b) for b, _ in factors.values())  # trained: B moved
    built = worker.with_alignment_lora(built, adapter)
    inner = built.model.base_model.model
    name = "model.layers.0.self_attn.q_proj"
    b1, a1 = factors[name]
    torch.testing.assert_close(inner.get_submodule(name).base_layer.weight,
                               base[f"{name}.weight"] + scale * b1 @ a1)
    assert all(torch.count_nonzero(p) == 0 for n, p in built.model.named_parameters() if "lora_B" in n)
    trainer = AsFTTrainer(built.model, data, built.settings.model_copy(update={"max_steps": 1}), AsFTParams(),
                          seed=0, workdir=tmp_path / "ft", pad_token_id=tokenizer.eos_token_id,
                          extra_data={"align_adapter": adapter}, progress=False)
    cost = worker._penalty_cost(trainer, calls=2)
    assert (cost["anchored"], cost["unanchored"]) == (6, 0) and cost["penalty_seconds"] > 0


def test_repair_cost_times_safemerge_on_both_adapters(bench, tmp_path):
    from alignshield.config import load_config

    repair_cost = bench[2]
    model_dir = repair_cost._tiny_model_dir(tmp_path)
    cfg = load_config(preset="embedded", overrides=[f"model.name={model_dir}", "model.dtype=float32",
                                                    "finetune.lora.target_modules=[q_proj,k_proj,v_proj]",
                                                    "repair.method=safemerge"])
    from alignshield.repair import safelora, safemerge

    rp = repair_cost.worker_repair_safemerge(cfg)
    assert 0 < rp["cosine_test_seconds"] <= rp["repair_seconds"]
    assert safemerge.factor_similarity is safelora.factor_similarity  # the timing wrapper is undone
    assert rp["n_modules"] == rp["n_tested"] == 12 and rp["n_kept_no_safety"] == 0  # 4 layers x q, k, v
    low, high = rp["cos_range"]
    assert rp["n_merged"] == 0 if low >= 0.35 else rp["n_merged"] >= 1
    assert high < 0.35 or rp["n_merged"] < 12
    _, own_rows, own_keys = repair_cost.METHOD_REPORTS["safemerge"]
    rows = dict(own_rows(rp))
    assert rows["repair: modules merged / tested / all"] == f"{rp['n_merged']} / 12 / 12"
    assert rows["repair: threshold, weights (fine-tune, safety)"] == "0.35, (0.8, 0.2)"
    assert own_keys(rp)["weights"] == [0.8, 0.2]
    assert "safemerge" in repair_cost.REPAIR_WORKERS
