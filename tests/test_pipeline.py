"""The four stages end to end on a tiny model saved to disk, loaded by path like any HF checkpoint."""

import json

import pytest

from alignshield import stages
from alignshield.config import load_config
from alignshield.train import Trainer


def test_run_writes_every_artifact(make_cfg):
    cfg = make_cfg()
    metrics = stages.run(cfg)
    dirs = stages.stage_dirs(cfg)
    for stage in ("align", "finetune"):
        assert (dirs[stage] / "adapter" / "adapter_model.safetensors").exists()
        assert (dirs[stage] / "config.yaml").exists() and (dirs[stage] / "stage.json").exists()
        assert not dirs[stage].with_name(dirs[stage].name + ".partial").exists()
    mix = [json.loads(line) for line in (dirs["finetune"] / "mix.jsonl").read_text().splitlines()]
    assert len(mix) == 10 and sum(r["harmful"] for r in mix) == 1
    assert metrics["harmful_prompts"] == 4 and "harmful_score/keyword" in metrics
    assert "finetune_accuracy/strict" in metrics
    samples = (dirs["evaluate"] / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8
    assert json.loads((dirs["evaluate"] / "metrics.json").read_text()) == metrics


def test_finished_stages_are_reused(make_cfg, monkeypatch):
    stages.run(make_cfg())
    align_dir = stages.stage_dirs(make_cfg())["align"]
    calls = []
    original = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self: calls.append(1) or original(self))
    stages.run(make_cfg())
    assert calls == []  # nothing recomputed
    cfg = make_cfg("finetune.p=0.5")
    stages.run(cfg)
    assert calls == [1]  # only the new fine-tune trains; the alignment is shared
    assert stages.stage_dirs(cfg)["align"] == align_dir


def test_no_alignment_and_single_lora(make_cfg):
    none = make_cfg("align.method=none")
    stages.run(none)
    assert not (stages.stage_dirs(none)["align"] / "adapter").exists()
    single = make_cfg("finetune.topology=single-lora")
    metrics = stages.run(single)
    assert "harmful_score/keyword" in metrics


def test_results_are_reproducible(make_cfg, tmp_path):
    a = stages.run(make_cfg())
    b = stages.run(make_cfg(f"output_dir={tmp_path / 'again'}"))
    assert a.pop("seconds") and b.pop("seconds")
    assert a == b
    first = stages.stage_dirs(make_cfg())["finetune"] / "adapter" / "adapter_model.safetensors"
    second = stages.stage_dirs(make_cfg(f"output_dir={tmp_path / 'again'}"))["finetune"]
    assert first.read_bytes() == (second / "adapter" / "adapter_model.safetensors").read_bytes()


def test_unused_repair_settings_do_not_key_the_evaluation():
    """With repair.method=none the calibration pool is unused: changing it must not invalidate (or
    duplicate) a finished evaluation; with a repair that edits the adapter it must."""
    pool = "repair.calibration={dataset: beavertails_unsafe, start: 2200, stop: 2300}"
    plain = stages.stage_dirs(load_config(overrides=["repair.method=none"]))["evaluate"]
    assert stages.stage_dirs(load_config(overrides=["repair.method=none", pool]))["evaluate"] == plain
    repaired = stages.stage_dirs(load_config(overrides=["repair.method=antidote"]))["evaluate"]
    assert repaired != plain
    assert stages.stage_dirs(load_config(overrides=["repair.method=antidote", pool]))["evaluate"] != repaired


def test_no_finetune_evaluates_the_aligned_model_as_shipped(make_cfg):
    from alignshield.config import ConfigError
    from alignshield.evaluate.metrics import generate_answers

    cfg = make_cfg("finetune.method=none")
    metrics = stages.run(cfg)
    dirs = stages.stage_dirs(cfg)
    assert not (dirs["finetune"] / "adapter").exists()
    assert json.loads((dirs["finetune"] / "stage.json").read_text())["report"] == {"trained": False}
    # the same answers as the aligned model generates itself: no adapter was added on top
    aligned, tokenizer = stages._aligned_model(stages.resolve(cfg))
    _, samples = generate_answers(aligned, tokenizer, stages.resolve(cfg))
    answers = [json.loads(line)["answer"] for line in (dirs["evaluate"] / "samples.jsonl").read_text().splitlines()]
    assert answers == [s["answer"] for s in samples] and "harmful_score/keyword" in metrics
    # the fine-tune's unused settings do not key it; the task does (the accuracy is measured on it)
    # (nor the topology: without a fine-tune adapter the model is base + LoRA #1 merged either way)
    assert stages.stage_dirs(make_cfg("finetune.method=none", "finetune.p=0.5", "finetune.n=20",
                                      "finetune.topology=single-lora")) == dirs
    assert stages.stage_dirs(make_cfg("finetune.method=none", "finetune.task=agnews"))["evaluate"] != dirs["evaluate"]
    with pytest.raises(ConfigError, match="trains none"):
        stages.validate(make_cfg("finetune.method=none", "repair.method=antidote"))
