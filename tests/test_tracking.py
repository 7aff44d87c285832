"""Experiment trackers through accelerate (tracking.py): TensorBoard event files mirror the stage logs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_losses_method_signals_and_metrics(make_cfg, tmp_path):
    from alignshield import stages

    common = ("align.method=vaccine", "repair.method=antidote", "evaluate.judges=[keyword]")
    cfg = make_cfg(*common, "tracking.backends=[tensorboard]")
    untracked = make_cfg(*common)
    assert stages.stage_dirs(cfg) == stages.stage_dirs(untracked), "tracking is not part of any key"
    metrics = stages.run(cfg)
    dirs = stages.stage_dirs(cfg)
    root = tmp_path / "tracking"

    for stage in ("align", "finetune"):
        logged = _scalars(root / stage / dirs[stage].name)
        history = [json.loads(line) for line in (dirs[stage] / "train_log.jsonl").read_text().splitlines()]
        assert logged["loss"] == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in history]
        assert [s for s, _ in logged["step_seconds"]] == [h["step"] for h in history]
    rho = cfg.align.params.get("rho", 2.0)
    norms = [v for _, v in _scalars(root / "align" / dirs["align"].name)["vaccine/perturbation_norm"]]
    assert norms and all(v == pytest.approx(rho, rel=1e-3) for v in norms)  # e has global norm rho

    report = json.loads((dirs["repair"] / "stage.json").read_text())["report"]
    repaired = _scalars(root / "repair" / dirs["repair"].name)
    assert repaired["total_zeroed"][0][1] == report["total_zeroed"] > 0  # Antidote's edit, as recorded

    evaluated = _scalars(root / "evaluate" / dirs["evaluate"].name)
    assert evaluated["harmful_score/keyword"][0][1] == pytest.approx(metrics["harmful_score/keyword"])
