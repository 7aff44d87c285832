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


def test_a_retrained_judge_is_a_new_evaluation(tmp_path):
    """The evaluation's key holds a digest of the judge's weights: rewriting them (a retrained judge)
    gives a new evaluation folder, so old verdicts are never reused; the same bytes give the same one."""
    import shutil

    from alignshield.evaluate.judges import embedded

    weights = tmp_path / "judge"
    shutil.copytree(embedded.WEIGHTS_DIR, weights)
    over = ["evaluate.judges=[embedded]", f"evaluate.judge_options={{embedded: {{weights: {weights}}}}}"]
    before = stages.stage_dirs(load_config(overrides=over))["evaluate"]
    assert stages.stage_dirs(load_config(overrides=over))["evaluate"] == before
    (weights / embedded.HEAD_FILE).write_bytes((weights / embedded.HEAD_FILE).read_bytes() + b" ")
    assert stages.stage_dirs(load_config(overrides=over))["evaluate"] != before


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


# ------------------------------------------------------------------------ fail fast, before any compute


def _no_training(monkeypatch):
    def refuse(self):
        raise AssertionError("training started before the config was checked")

    monkeypatch.setattr(Trainer, "train", refuse)


@pytest.mark.parametrize("overrides,message", [
    (["finetune.n=100000"], r"finetune.n=100000 with finetune.p=0.1 needs 90000 task examples, but the sst2 train"),
    (["finetune.harmful.start=0", "finetune.harmful.stop=1", "finetune.n=40"], r"needs 4 harmful examples, but "
     r"finetune.harmful \(beavertails_unsafe rows \[0, 1\)\) holds 1"),
    (["evaluate.task_n=5000"], r"evaluate.task_n=5000, but the sst2 test split .* holds 872"),
    (["evaluate.judges=[embedded]", "evaluate.judge_options={embedded: {weights: /nonexistent}}"],
     r"weights missing in /nonexistent"),
])
def test_bad_settings_fail_before_alignment_trains(make_cfg, monkeypatch, overrides, message):
    from alignshield.config import ConfigError
    from alignshield.evaluate.judges import JudgeLoadError

    _no_training(monkeypatch)
    cfg = make_cfg(*overrides)
    with pytest.raises((ConfigError, JudgeLoadError), match=message):
        stages.run(cfg)
    assert not stages.stage_dirs(cfg)["align"].exists()


def test_a_folder_without_a_model_is_a_clear_error(tmp_path, monkeypatch):
    from alignshield.config import ConfigError

    _no_training(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no model here")
    for name, message in [(tmp_path / "empty", r"holds no config.json \(it holds notes.txt\)"),
                          (tmp_path / "missing", "no such folder")]:
        cfg = load_config(overrides=[f"model.name={name}", f"output_dir={tmp_path / 'out'}"])
        with pytest.raises(ConfigError, match=message):
            stages.run(cfg)


def test_other_judges_reuse_the_answers(make_cfg, monkeypatch):
    """An evaluation that differs only in its judges (or their weights, or the coherence gate) is a new
    evaluation folder, but it judges the answers already generated instead of generating them again;
    any other evaluation setting generates anew."""
    from alignshield.evaluate import metrics as metrics_module

    first = make_cfg()
    stages.run(first)
    kept = stages.answers_dir(first) / stages.ANSWERS_FILE
    saved = json.loads(kept.read_text())
    assert len(saved["samples"]) == 8 and all(s["verdicts"] == {} for s in saved["samples"] if s["kind"] == "harmful")
    rejudged = make_cfg("evaluate.coherence_gate=false")
    assert stages.stage_dirs(rejudged)["evaluate"] != stages.stage_dirs(first)["evaluate"]
    assert stages.answers_dir(rejudged) == stages.answers_dir(first)
    generate = metrics_module.generate_answers
    monkeypatch.setattr(metrics_module, "generate_answers", lambda *a, **k: pytest.fail("generated again"))
    again = stages.run(rejudged)
    assert again["harmful_prompts"] == 4 and "harmful_score/keyword" in again
    answers = [json.loads(line)["answer"] for line in
               (stages.stage_dirs(rejudged)["evaluate"] / "samples.jsonl").read_text().splitlines()]
    assert answers == [s["answer"] for s in saved["samples"]]
    longer = make_cfg("evaluate.max_new_tokens=5")
    assert stages.answers_dir(longer) != stages.answers_dir(first)
    calls = []
    monkeypatch.setattr(metrics_module, "generate_answers", lambda *a, **k: calls.append(1) or generate(*a, **k))
    stages.run(longer)
    assert calls == [1]
