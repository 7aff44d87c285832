"""Sweeps, the results database, `results` and `report`: on tiny models saved to disk, or on synthetic
records where no training is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from alignshield import stages
from alignshield.cli import app
from alignshield.config import PRESETS_DIR, ConfigError, load_config
from alignshield.experiments import report as rp
from alignshield.experiments.store import ResultStore, RunRecord
from alignshield.experiments.sweep import GRIDS_DIR, expand, load_sweep, restrict, run_sweep
from alignshield.train import Trainer

SRC = Path(__file__).resolve().parent.parent / "src"


def tiny_overrides(model_dir: Path, out: Path) -> dict:
    """make_cfg's settings (tests/test_pipeline.py) as a grid's base: every run takes seconds."""
    return {
        "model.name": str(model_dir), "model.dtype": "float32", "output_dir": str(out),
        "align.data.safety.stop": 8, "align.data.benign.stop": 8,
        "align.train": {"max_steps": 3, "batch_size": 4, "max_length": 48, "checkpoint_every": 1},
        "align.lora.target_modules": ["q_proj", "v_proj"], "finetune.lora.target_modules": ["q_proj", "v_proj"],
        "finetune.n": 10,
        "finetune.train": {"max_steps": 3, "batch_size": 4, "max_length": 48, "checkpoint_every": 1},
        "evaluate.harmful.stop": 4, "evaluate.task_n": 4, "evaluate.max_new_tokens": 4,
    }


def write_grid(path: Path, model_dir: Path, out: Path, grid: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"overrides": tiny_overrides(model_dir, out), "grid": grid, **extra}))
    return path


# ----------------------------------------------------------------------------------- expansion


def test_product_and_zip_expand_in_order_with_typed_values(tmp_path):
    sweep = expand({
        "overrides": {"output_dir": str(tmp_path)},
        "grid": {"align.method": ["sft", "vaccine"], "seed": [1, 2]},
        # "1e-5" is a string to YAML 1.1; the recorded value is the config's float
        "zip": {"finetune.train.learning_rate": ["1e-5", 1.0e-4], "finetune.train.epochs": [20, 5]},
    }, source=tmp_path / "g.yaml")
    assert len(sweep.runs) == 8 and sweep.swept_fields == [
        "align.method", "seed", "finetune.train.learning_rate", "finetune.train.epochs"]
    first, last = sweep.runs[0], sweep.runs[-1]
    assert first.swept == {"align.method": "sft", "seed": 1, "finetune.train.learning_rate": 1e-5,
                           "finetune.train.epochs": 20.0}
    assert last.swept["align.method"] == "vaccine" and last.swept["finetune.train.learning_rate"] == 1e-4
    assert last.config.finetune.train.epochs == 5 and last.config.align.params == {"rho": 2.0, "refresh_every": 1}
    assert len({r.key for r in sweep.runs}) == 8
    # the fine-tune settings do not touch the alignment: one per (method, seed), shared
    assert len({r.dirs["align"] for r in sweep.runs}) == 4


def test_grid_overrides_merge_and_command_line_wins(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"preset": "quick", "overrides": {"finetune.train": {"learning_rate": 0.5}},
                                    "grid": {"seed": [1]}}))
    sweep = load_sweep(grid, overrides=["finetune.n=12", f"output_dir={tmp_path}"])
    cfg = sweep.runs[0].config
    assert cfg.finetune.train.learning_rate == 0.5 and cfg.finetune.train.max_steps == 4  # merged onto quick
    assert cfg.finetune.n == 12 and cfg.output_dir == str(tmp_path)
    assert load_sweep(grid, preset="embedded").runs[0].config.finetune.train.max_steps == 60


@pytest.mark.parametrize("data, message", [
    ({"grid": {"finetune.pp": [0.1]}}, "did you mean 'p'"),
    ({"grid": {"finetune.p": 0.1}}, "non-empty list"),
    ({"grid": {"finetune.p": [0.1]}, "overrides": {"finetune.p": 0.2}}, "swept by the grid"),
    ({"zip": {"finetune.p": [0.1, 0.2], "seed": [1]}}, "one length"),
    ({"grid": {"seed": [1]}, "zip": {"seed": [2]}}, "more than one axis"),
    ({"grid": {"output_dir": ["a", "b"]}}, "output_dir cannot be swept"),
    ({"grids": {"seed": [1]}}, "unknown key"),
    ({"grid": {"finetune.p": [2.0]}}, "must lie in"),
])
def test_bad_grids_fail_before_any_compute_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        expand(data)


def test_identical_points_are_one_run(tmp_path):
    sweep = expand({"overrides": {"output_dir": str(tmp_path)}, "grid": {"finetune.p": [0.1, 0.10, 0.2]}})
    assert len(sweep.runs) == 2 and sweep.duplicates == [(1, 0)]


# ----------------------------------------------------------------------------------- shipped presets and grids


def _registered_or_skip(cfg) -> None:
    from alignshield.align import ALIGN_METHODS
    from alignshield.finetune import FINETUNE_METHODS
    from alignshield.repair import REPAIR_METHODS

    for registry, name in ((ALIGN_METHODS, cfg.align.method), (FINETUNE_METHODS, cfg.finetune.method),
                           (REPAIR_METHODS, cfg.repair.method)):
        if name not in registry:
            pytest.skip(f"{registry.kind} {name!r} is not registered yet")


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_resolves_and_validates(preset):
    cfg = load_config(preset=preset)
    _registered_or_skip(cfg)
    stages.validate(stages.resolve(cfg))  # methods, params, pools (sizes and disjointness), task, judges


@pytest.mark.parametrize("grid", sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
def test_every_shipped_grid_expands_and_validates(grid):
    from alignshield.align import ALIGN_METHODS
    from alignshield.repair import REPAIR_METHODS

    data = yaml.safe_load((GRIDS_DIR / f"{grid}.yaml").read_text())
    base = load_config(preset=data.get("preset"))
    _registered_or_skip(base)
    for registry, field in ((ALIGN_METHODS, "align.method"), (REPAIR_METHODS, "repair.method")):
        for name in data["grid"].get(field, []):
            if name not in registry:
                pytest.skip(f"{registry.kind} {name!r} is not registered yet")
    sweep = load_sweep(grid)
    assert sweep.runs and not sweep.duplicates
    for run in sweep.runs:
        stages.validate(run.config)


def test_paper_presets_resolve_to_the_papers_settings():
    v = load_config(preset="vaccine-llama2")
    assert v.model.name == "meta-llama/Llama-2-7b-hf"
    assert (v.align.lora.r, v.align.lora.alpha, v.align.lora.dropout) == (8, 1, 0.1)
    assert len(v.align.lora.target_modules) == 7
    assert (v.align.train.epochs, v.align.train.learning_rate, v.align.train.max_steps) == (50, 1e-3, None)
    assert (v.align.train.lr_scheduler, v.align.train.weight_decay, v.align.train.warmup_ratio) == ("cosine", 0.1, 0.1)
    assert v.align.data.safety.stop - v.align.data.safety.start == 2000
    assert (v.finetune.train.learning_rate, v.finetune.train.epochs, v.finetune.n) == (1e-5, 20, 1000)
    assert stages.resolve(v).align.params["rho"] == 2.0

    t = stages.resolve(load_config(preset="tvaccine-llama2"))
    assert {k: t.align.params[k] for k in ("rho", "layers_per_step", "score_every", "resample_every")} == {
        "rho": 3.0, "layers_per_step": 8, "score_every": 200, "resample_every": 20}
    assert t.align.train.epochs == 20

    a = load_config(preset="antidote-llama2")
    assert (a.finetune.lora.r, a.finetune.lora.alpha) == (256, 4)
    assert a.finetune.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert (a.finetune.n, a.finetune.p, a.finetune.train.learning_rate) == (5000, 0.2, 1e-4)
    from alignshield.repair import REPAIR_METHODS

    if "antidote" not in REPAIR_METHODS:
        pytest.skip("repair method 'antidote' is not registered yet")
    assert stages.resolve(a).repair.params["alpha"] == 0.1


# ----------------------------------------------------------------------------------- running, killing, resuming


def _final_state(out: Path) -> dict:
    """Metrics per run key (without timings) and the adapters' bytes: what must not depend on a kill."""
    metrics = {}
    for d in sorted((out / "evaluate").iterdir()):
        m = json.loads((d / "metrics.json").read_text())
        m.pop("seconds", None)
        metrics[d.name] = m
    adapters = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("adapter_model.safetensors"))}
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = sorted(db.execute("select run_key, metric, value from metrics where metric != 'seconds'"))
    return {"metrics": metrics, "adapters": adapters, "db": rows}


def test_kill9_mid_sweep_then_rerun_matches_an_uninterrupted_sweep(tmp_path, tiny_model_dir):
    grid = {"finetune.p": [0.0, 0.5]}
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    killed = write_grid(tmp_path / "killed.yaml", tiny_model_dir, out, grid)
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alignshield.cli", "sweep", str(killed)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(not p.name.endswith(".partial") for p in (out / "align").glob("*")):
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    finished = [d for d in (out / "evaluate").glob("*") if not d.name.endswith(".partial")]
    assert len(finished) < 2  # it was cut short

    rerun = CliRunner().invoke(app, ["sweep", str(killed)])
    assert rerun.exit_code == 0, rerun.output
    assert not list(out.rglob("*.partial"))

    reference = tmp_path / "reference"
    calls = []
    original = Trainer.train
    try:
        Trainer.train = lambda self: calls.append(1) or original(self)
        assert CliRunner().invoke(app, ["sweep", str(write_grid(tmp_path / "ref.yaml", tiny_model_dir,
                                                                reference, grid))]).exit_code == 0
        assert len(calls) == 3  # one alignment shared by two fine-tunes
        again = run_sweep(load_sweep(tmp_path / "ref.yaml"))
        assert len(calls) == 3 and len(again.cached) == 2 and not again.computed  # nothing recomputed
    finally:
        Trainer.train = original
    a, b = _final_state(out), _final_state(reference)
    assert a["metrics"] == b["metrics"] and len(a["metrics"]) == 2
    assert a["db"] == b["db"] and a["db"]
    assert {k.split("/", 1)[0] for k in a["adapters"]} == {"align", "finetune"}
    assert list(a["adapters"].values()) == list(b["adapters"].values())


def test_a_run_finished_but_not_recorded_is_recorded_without_recompute(tmp_path, tiny_model_dir, monkeypatch):
    grid = write_grid(tmp_path / "g.yaml", tiny_model_dir, tmp_path / "out", {"seed": [3]})
    sweep = load_sweep(grid)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed between the evaluation folder's rename and the commit

    with monkeypatch.context() as m:
        m.setattr(ResultStore, "record_run", die)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(sweep)
    assert sweep.runs[0].dirs["evaluate"].exists()
    calls = []
    original = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self: calls.append(1) or original(self))
    outcome = run_sweep(load_sweep(grid))
    assert calls == [] and outcome.computed == [sweep.runs[0].key]
    with ResultStore.in_dir(tmp_path / "out", readonly=True) as store:
        (run,) = store.runs()
    assert run.meta["computed"] == []  # every stage was on disk
    assert run.swept == {"seed": 3} and run.seed == 3 and "harmful_score/keyword" in run.metrics
    assert run.meta["versions"]["torch"] and run.meta["peak_rss_mb"] > 0 and run.meta["wall_seconds"] >= 0


def test_where_selects_runs_keeping_grid_positions(tmp_path):
    grid = {"grid": {"seed": [1, 2], "finetune.p": [0.0, 0.1]}}
    sweep = expand(grid)
    part = restrict(sweep, ["seed=2", "finetune.p=0.1"])
    assert [r.position for r in part.runs] == [3] and part.runs[0].key == sweep.runs[3].key
    assert [r.position for r in restrict(sweep, ["finetune.p=0"]).runs] == [0, 2]
    assert part.spec()["runs"] == 4  # the database records the grid, not the slice
    # one field given twice is either value; different fields must all match
    assert [r.position for r in restrict(sweep, ["finetune.p=0", "finetune.p=0.1", "seed=1"]).runs] == [0, 1]
    with pytest.raises(ConfigError, match="no run of sweep"):
        restrict(sweep, ["seed=7"])
    with pytest.raises(ConfigError, match="field=value"):
        restrict(sweep, ["seed"])


def test_a_stage_being_built_is_waited_for_then_reused(tmp_path):
    out = tmp_path / "align" / "sft-0123"
    building, results = threading.Event(), []

    def first():
        with stages._stage_output(out) as work:
            building.set()
            time.sleep(0.5)  # the second caller arrives meanwhile and must wait
            (work / "adapter").write_text("built once")
            results.append(("first", work))

    def second():
        building.wait()
        with stages._stage_output(out) as work:
            results.append(("second", work))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    with stages.recording_builds() as built:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [who for who, _ in results] == ["first", "second"]
    assert results[1][1] is None  # found finished: nothing to build
    assert (out / "adapter").read_text() == "built once" and built == [out]
    assert not out.with_name(out.name + ".partial").exists()


def test_two_sweeps_into_one_folder_share_stages(tmp_path, tiny_model_dir):
    """Two real processes, each a slice of one grid; the alignment they share is trained once."""
    out = tmp_path / "out"
    grid = write_grid(tmp_path / "g.yaml", tiny_model_dir, out, {"finetune.p": [0.0, 0.5]})
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "alignshield.cli", "sweep", str(grid), "--where", f"finetune.p={p}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
             for p in (0.0, 0.5)]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(logs)[-3000:]
    with ResultStore.in_dir(out, readonly=True) as store:
        runs = store.runs("g")
    assert sorted(r.config["finetune"]["p"] for r in runs) == [0.0, 0.5]
    computed = [stage for r in runs for stage in r.meta["computed"]]
    assert sorted(computed) == ["align", "evaluate", "evaluate", "finetune", "finetune"]
    assert len(list((out / "align").iterdir())) == 1 and not list(out.rglob("*.partial"))


# ----------------------------------------------------------------------------------- the database, results, report


def _hs(method: str, p: float, seed: int, alpha: float | None = None) -> float:
    base = {"none": 60, "sft": 40, "vaccine": 20}[method]
    return base + 100 * p + seed - (50 * alpha if alpha else 0)


@pytest.fixture
def synthetic(tmp_path):
    """A database as two sweeps would leave it: methods x p x seeds, and an alpha sweep."""
    out = tmp_path / "runs"
    with ResultStore.in_dir(out) as store:
        store.record_sweep("main", "main.yaml", {"axes": [{"fields": ["align.method"]}, {"fields": ["finetune.p"]},
                                                          {"fields": ["seed"]}]})
        store.record_sweep("alpha", "alpha.yaml", {"axes": [{"fields": ["repair.params.alpha"]}]})
        i = 0
        for method in ("none", "sft", "vaccine"):
            for p in (0.0, 0.1, 0.2):
                for seed in (1, 2, 3):
                    cfg = load_config(overrides=[f"align.method={method}", f"finetune.p={p}", f"seed={seed}"])
                    rec = RunRecord(f"k{i}", cfg.model_dump(mode="json"), {"align.method": method, "finetune.p": p,
                                                                           "seed": seed}, seed,
                                    versions={"torch": "2.13.0"}, git_revision="abc", wall_seconds=1.5,
                                    peak_rss_mb=100.0 + i)
                    store.record_run(rec, {"harmful_score/keyword": _hs(method, p, seed),
                                           "finetune_accuracy/strict": 90 - 10 * p - seed, "seconds": 1.0,
                                           "note": "not a number"}, sweep="main", position=i)
                    i += 1
        for alpha in (0.01, 0.05, 0.1):
            cfg = load_config(overrides=[f"repair.params={{alpha: {alpha}}}"])
            rec = RunRecord(f"a{alpha}", cfg.model_dump(mode="json"), {"repair.params.alpha": alpha}, 42)
            store.record_run(rec, {"harmful_score/keyword": _hs("sft", 0.1, 0, alpha)}, sweep="alpha", position=i)
            i += 1
    return out


def test_rows_are_one_per_run_and_metric(synthetic):
    with sqlite3.connect(synthetic / "results.sqlite") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 30
        # 27 runs x 3 numeric metrics + 3 runs x 1; the text metric is not stored
        assert db.execute("select count(*) from results").fetchone()[0] == 27 * 3 + 3
        row = db.execute("select sweeps, seed, git_revision, json_extract(swept_json, '$.\"finetune.p\"') "
                         "from results where run_key='k4'").fetchone()
    assert row == ("main", 2, "abc", 0.1)


def test_results_mean_std_per_group_filter_and_csv(synthetic, tmp_path):
    with ResultStore.in_dir(synthetic, readonly=True) as store:
        runs = rp.select(store.runs("main"), ["finetune.p=0.1"])
    groups = rp.aggregate(runs, ["align.method"], ["harmful_score/keyword"])
    assert [g.values for g in groups] == [("none",), ("sft",), ("vaccine",)]
    vaccine = groups[2].stats["harmful_score/keyword"]
    assert vaccine.n == 3 and vaccine.mean == pytest.approx(32.0) and vaccine.std == pytest.approx(1.0)
    with ResultStore.in_dir(synthetic, readonly=True) as store:
        both = rp.select(store.runs("main"), ["align.method=sft", "align.method=vaccine", "finetune.p=0.1"])
    assert sorted(r.swept["align.method"] for r in both) == ["sft"] * 3 + ["vaccine"] * 3

    csv_path = tmp_path / "t.csv"
    result = CliRunner().invoke(app, ["results", "-o", str(synthetic), "--sweep", "main", "--where", "align.method=vaccine",
                                      "-g", "finetune.p", "-m", "harmful_score/*", "--csv", str(csv_path)])
    assert result.exit_code == 0, result.output
    assert "22.00 ± 1.00" in result.output and "42.00 ± 1.00" in result.output
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ("finetune.p,n,seeds,harmful_score/keyword mean,harmful_score/keyword std,"
                        "harmful_score/keyword ci95_low,harmful_score/keyword ci95_high")
    assert lines[1].split(",")[:3] == ["0", "3", "1 2 3"] or lines[1].split(",")[:3] == ["0.0", "3", "1 2 3"]
    bad = CliRunner().invoke(app, ["results", "-o", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "no results database" in bad.output


def test_report_draws_only_the_plots_the_data_supports(synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    report = rp.build_report(synthetic, tmp_path / "report")
    names = sorted(p.name for p in report.figures)
    assert names == ["alpha-hs-vs-repair-params-alpha.png", "main-hs-vs-fa.png", "main-hs-vs-finetune-p.png"]
    md = report.markdown.read_text()
    assert "## main" in md and "## alpha" in md
    assert "![harmful_score/keyword vs finetune.p](main-hs-vs-finetune-p.png)" in md
    assert "| vaccine | 0.1 | 3 | 1,2,3 | 32.00 ± 1.00 |" in md
    page = report.html.read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    # no learning-rate or epoch axis in this data: no such plot
    assert not list((tmp_path / "report").glob("*learning*"))


def test_report_takes_dict_valued_swept_fields(tmp_path):
    """A zipped ``align.params`` column (as in embedded-baselines) is a dict per run: tabled, not plotted."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs"
    with ResultStore.in_dir(out) as store:
        store.record_sweep("baselines", "b.yaml", {"axes": [{"fields": ["align.method", "align.params"]},
                                                            {"fields": ["seed"]}]})
        for i, (method, params) in enumerate([("sft", {}), ("tar", {"inner_steps": 4})] * 2):
            seed = 1 + i // 2
            cfg = load_config(overrides=[f"align.method={method}", f"align.params={params}", f"seed={seed}"])
            rec = RunRecord(f"b{i}", cfg.model_dump(mode="json"),
                            {"align.method": method, "align.params": params, "seed": seed}, seed)
            store.record_run(rec, {"harmful_score/keyword": 10.0 + i, "finetune_accuracy/strict": 80.0},
                             sweep="baselines", position=i)
    report = rp.build_report(out, tmp_path / "report")
    assert [p.name for p in report.figures] == ["baselines-hs-vs-fa.png"]
    assert "| tar | {inner_steps: 4} | 2 | 1,2 | 12.00 ± 1.41 |" in report.markdown.read_text()


def test_report_plots_a_zipped_field_without_mixing_its_partners(tmp_path, saved_figures):
    """A zip is a list of settings: HS vs rho keeps RandomVaccine at rho 2 apart from Vaccine's rho line (even
    before Vaccine's own rho-2 run is in), and fields zipped in lockstep (T-Vaccine's S and J) get one plot
    between them, not one each."""
    out = tmp_path / "runs"
    grids = {"vac": (["align.method", "align.params.rho"],
                     [("random-vaccine", 2.0), ("vaccine", 0.5), ("vaccine", 2.0), ("vaccine", 5.0)]),
             "tv": (["align.params.layers_per_step", "align.params.resample_every"], [(30, 20), (8, 5)])}
    with ResultStore.in_dir(out) as store:
        i = 0
        for sweep, (fields, values) in grids.items():
            store.record_sweep(sweep, f"{sweep}.yaml", {"axes": [{"fields": fields, "values": values}]})
            for swept in (dict(zip(fields, v)) for v in values if v != ("vaccine", 2.0)):  # a partial sweep
                cfg = load_config(overrides=[f"{k}={v}" for k, v in swept.items()])
                store.record_run(RunRecord(f"z{i}", cfg.model_dump(mode="json"), swept, 1),
                                 {"harmful_score/keyword": 10.0 + i, "finetune_accuracy/strict": 80.0 - i},
                                 sweep=sweep, position=i)
                i += 1
    report = rp.build_report(out, tmp_path / "report")
    assert sorted(p.name for p in report.figures) == ["tv-hs-vs-align-params-layers-per-step.png", "tv-hs-vs-fa.png",
                                                      "vac-hs-vs-align-params-rho.png", "vac-hs-vs-fa.png"]
    rho = next(f for f in saved_figures if f.axes[0].get_xlabel() == "align.params.rho").axes[0]
    lines = {label: list(h[0].get_xdata()) for h, label in zip(*rho.get_legend_handles_labels())}
    assert lines == {"random-vaccine": [2.0], "vaccine": [0.5, 5.0]}


def test_report_command_writes_into_out(synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(app, ["report", "-o", str(synthetic), "--out", str(tmp_path / "docs"), "-s", "alpha"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "docs" / "report.md").exists() and (tmp_path / "docs" / "report.html").exists()
    assert [p.name for p in (tmp_path / "docs").glob("*.png")] == ["alpha-hs-vs-repair-params-alpha.png"]


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures the report saves, to inspect their lines and legends."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure as MplFigure

    saved, savefig = [], MplFigure.savefig
    monkeypatch.setattr(MplFigure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k)))
    return saved


def test_report_plots_tell_a_dozen_series_apart(tmp_path, saved_figures):
    """Past matplotlib's ten colours, every point of the HS-vs-FA plot still has its own colour and marker."""
    out = tmp_path / "runs"
    with ResultStore.in_dir(out) as store:
        store.record_sweep("alpha", "alpha.yaml", {"axes": [{"fields": ["repair.method"]},
                                                            {"fields": ["repair.params.alpha"]}]})
        for i, (method, alpha) in enumerate((m, a) for m in ("antidote", "random-prune", "magnitude-prune")
                                             for a in (0.01, 0.05, 0.1, 0.2)):
            swept = {"repair.method": method, "repair.params.alpha": alpha}
            cfg = load_config(overrides=[f"{k}={v}" for k, v in swept.items()])
            store.record_run(RunRecord(f"r{i}", cfg.model_dump(mode="json"), swept, 1),
                             {"harmful_score/keyword": 20.0 + i, "finetune_accuracy/strict": 60.0 + i},
                             sweep="alpha", position=i)
    rp.build_report(out, tmp_path / "report")
    scatter = next(f for f in saved_figures if "finetune accuracy" in f.axes[0].get_title())
    handles, labels = scatter.axes[0].get_legend_handles_labels()
    styles = {(h[0].get_color(), h[0].get_marker()) for h in handles}
    assert len(labels) == 12 and len(styles) == 12


def _chromium() -> str | None:
    return next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


def _headless_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    browser = _chromium()
    if browser is None:
        # CI installs Chromium and sets this, so the check cannot quietly turn into a skip there
        if os.environ.get("ALIGNSHIELD_REQUIRE_BROWSER") == "1":
            pytest.fail("ALIGNSHIELD_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("chromium is not installed")
    # the no-network flags keep Chromium from trying (and failing) to reach Google's services offline
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_page_renders_in_a_browser(synthetic, tmp_path):
    """What a user sees: a headless Chromium screenshot of report.html shows the plots, not blank space."""
    pytest.importorskip("matplotlib")
    report = rp.build_report(synthetic, tmp_path / "report")
    shot = tmp_path / "shot.png"
    _headless_chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", report.html.as_uri())
    assert shot.exists(), "chromium wrote no screenshot"
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1100
    # the page is not blank: a good share of non-white pixels (tables, plot lines and axes)
    non_white = (pixels[..., :3].mean(axis=-1) < 0.9).mean()
    assert non_white > 0.02
    # the plots' coloured lines render (matplotlib's default blue, C0 = #1f77b4)
    blue = ((abs(pixels[..., 0] - 0x1F / 255) < 0.08) & (abs(pixels[..., 1] - 0x77 / 255) < 0.08)
            & (abs(pixels[..., 2] - 0xB4 / 255) < 0.08)).sum()
    assert blue > 200


def test_report_page_does_not_run_off_a_narrow_window(synthetic, tmp_path):
    """Wide tables scroll inside their own box; the page itself never needs a horizontal scroll bar."""
    pytest.importorskip("matplotlib")
    report = rp.build_report(synthetic, tmp_path / "report")
    page = tmp_path / "measured.html"
    page.write_text(report.html.read_text() + "<script>document.body.setAttribute('data-overflow', "
                    "document.documentElement.scrollWidth - window.innerWidth)</script>")
    dom = _headless_chromium(tmp_path, "--window-size=560,900", "--dump-dom", page.as_uri()).stdout
    overflow = re.search(r'data-overflow="(-?\d+)"', dom)
    assert overflow, dom[-2000:]
    assert int(overflow.group(1)) <= 0


def test_paired_comparisons_from_stored_verdicts(tmp_path):
    import random

    out = tmp_path / "runs"
    rng = random.Random(1)
    with ResultStore.in_dir(out) as store:
        store.record_sweep("cmp", "cmp.yaml", {"axes": [{"fields": ["align.method"]}, {"fields": ["seed"]}]})
        for i, (method, rate) in enumerate([(m, r) for m, r in (("sft", 0.4), ("vaccine", 0.1)) for _ in range(2)]):
            seed = i % 2 + 1
            cfg = load_config(overrides=[f"align.method={method}", f"seed={seed}"])
            flags = [rng.random() < rate for _ in range(80)]
            rec = RunRecord(f"{method}{seed}", cfg.model_dump(mode="json"), {"align.method": method, "seed": seed},
                            seed, verdicts=[(p, "keyword", f, None, "x") for p, f in enumerate(flags)])
            store.record_run(rec, {"harmful_score/keyword": 100 * sum(flags) / 80, "harmful_prompts": 80},
                             sweep="cmp", position=i)
        assert sum(store.verdicts("sft1", "keyword").values()) > 0
    result = CliRunner().invoke(app, ["results", "-o", str(out), "--compare"])
    assert result.exit_code == 0, result.output
    assert "paired comparisons of harmful_score/keyword" in result.output and "2 × 80" in result.output
    report = rp.build_report(out, tmp_path / "report", html_page=False)
    text = report.markdown.read_text()
    assert "Paired comparisons" in text and "align.method=sft | align.method=vaccine | align.method | +" in text


def test_a_version_1_database_is_migrated_with_each_runs_dtype(tmp_path):
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute("CREATE TABLE runs (run_key TEXT PRIMARY KEY, config_json TEXT NOT NULL, swept_json TEXT NOT NULL,"
                   " seed INTEGER, stage_dirs_json TEXT, computed_json TEXT, versions_json TEXT, git_revision TEXT,"
                   " wall_seconds REAL, peak_rss_mb REAL, peak_rss_scope TEXT, peak_gpu_mb REAL, world_size INTEGER,"
                   " host TEXT, finished_at TEXT)")
        db.execute("INSERT INTO runs (run_key, config_json, swept_json, seed) VALUES "
                   "('old', '{\"model\": {\"dtype\": \"bfloat16\"}}', '{}', 1)")
    with ResultStore(path) as store:
        (run,) = store.runs()
        assert run.meta["dtype"] == "bfloat16" and store.verdicts("old", "keyword") == {}


def test_a_run_evaluated_again_under_a_new_judge_replaces_the_old_one_in_tables(tmp_path):
    """Two evaluations of one config (the second after the judge was retrained: a new evaluation key,
    the same config) are one run in the tables: the latest; the older stays readable on request."""
    out = tmp_path / "runs"
    cfg = load_config(overrides=["seed=1"]).model_dump(mode="json")
    with ResultStore.in_dir(out) as store:
        store.record_sweep("s", "s.yaml", {"axes": [{"fields": ["seed"]}]})
        for key, hs in (("old-judge", 30.0), ("new-judge", 10.0)):
            store.record_run(RunRecord(key, cfg, {"seed": 1}, 1), {"harmful_score/embedded": hs}, sweep="s", position=0)
        other = load_config(overrides=["seed=2"]).model_dump(mode="json")
        store.record_run(RunRecord("seed2", other, {"seed": 2}, 2), {"harmful_score/embedded": 5.0}, sweep="s", position=1)
        assert [r.run_key for r in store.runs("s")] == ["new-judge", "seed2"]
        assert [r.metrics["harmful_score/embedded"] for r in store.runs()] == [10.0, 5.0]
        assert len(store.runs("s", superseded=True)) == 3


def test_launcher_submits_one_job_per_slice_and_records_every_run(tmp_path, tiny_model_dir):
    pytest.importorskip("submitit")
    from typer.testing import CliRunner

    from alignshield.cli import app
    from alignshield.experiments.store import ResultStore

    grid = tmp_path / "grid.yaml"
    from conftest import TINY_RUN

    grid.write_text(yaml.safe_dump({"grid": {"seed": [1, 2], "finetune.p": [0.0, 0.5]}}))
    out = tmp_path / "runs"
    args = ["sweep", str(grid), f"model.name={tiny_model_dir}", f"output_dir={out}", *TINY_RUN,
            "evaluate.judges=[keyword]"]
    result = CliRunner().invoke(app, [*args, "--launcher", "local", "--slice-by", "seed"])
    assert result.exit_code == 0, result.output
    assert result.output.count("submitted seed=") == 2
    with ResultStore.in_dir(out, readonly=True) as store:
        assert len(store.runs("grid")) == 4
    assert len(list((out / "align").iterdir())) == 2  # one alignment per seed, built once
    bad = CliRunner().invoke(app, [*args, "--launcher", "local", "--slice-by", "finetune.lr"])
    assert bad.exit_code == 2 and "not a swept field" in bad.output


def test_grid_declared_plots_replace_the_inferred_ones(tmp_path, tiny_model_dir):
    from conftest import TINY_RUN

    grid = {"grid": {"finetune.p": [0.0, 0.5]},
            "plots": [{"x": "finetune.p", "y": "harmful_score/keyword", "title": "declared line"},
                      {"x": "finetune_accuracy/strict", "y": "harmful_score/keyword", "series": ["finetune.p"]}]}
    overrides = [f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'runs'}", *TINY_RUN,
                 "evaluate.judges=[keyword]"]
    sweep = expand(grid, overrides=overrides)
    run_sweep(sweep)
    report = rp.build_report(tmp_path / "runs", tmp_path / "report", html_page=False)
    names = sorted(p.name for p in report.figures)
    assert names == ["sweep-harmful-score-keyword-vs-finetune-accuracy-strict.png", "sweep-hs-vs-finetune-p.png"]

    for bad, message in [({"x": "finetune.p", "series": ["seed"]}, "not swept"),
                         ({"x": "finetune.q"}, "neither a swept field"), ({"x": "finetune.p", "colour": "red"}, "colour")]:
        with pytest.raises(ConfigError, match=message):
            expand({"grid": {"finetune.p": [0.0, 0.5]}, "plots": [bad]}, overrides=overrides)


@pytest.mark.parametrize("plots, tables, message", [
    ([{"x": "finetune.p", "facets": ["repair.method"]}], [], r"plots\[0\].facets \['repair.method'\] are not swept"),
    ([{"x": "finetune.p", "series": ["align.method"], "facets": ["align.method"]}], [], "also the plot's x or a series"),
    ([{"x": "finetune.p", "facets": ["finetune.p"]}], [], "also the plot's x or a series"),
    ([], [{"group_by": ["align.method", "finetune.q"]}], r"tables\[0\].group_by \['finetune.q'\] are not swept"),
    ([], [{"group_by": ["align.method"], "metrics": ["finetune.p"]}], "are swept fields, not metrics"),
    ([], [{"group_by": ["align.method"], "colums": ["x"]}], r"tables\[0\].colums: unknown key"),
    ([], [{"metrics": ["harmful_score/*"]}], r"tables\[0\].group_by: Field required"),
    ([], {"group_by": ["seed"]}, "tables is a list"),
])
def test_bad_declared_plots_and_tables_fail_when_the_grid_loads(tmp_path, plots, tables, message):
    """Before any run is expanded, and naming the grid file and the field."""
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"grid": {"align.method": ["sft", "vaccine"], "finetune.p": [0.0, 0.1]},
                                    "plots": plots, "tables": tables}))
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(grid)
    assert str(grid) in str(err.value)


def test_declared_tables_and_facets_are_recorded_with_the_sweep(tmp_path):
    sweep = expand({"overrides": {"output_dir": str(tmp_path)},
                    "grid": {"align.method": ["sft"], "repair.method": ["none", "antidote"], "seed": [1, 2]},
                    "plots": [{"x": "seed", "facets": ["repair.method"]}],
                    "tables": [{"group_by": ["repair.method"], "title": "t"}]})
    spec = sweep.spec()
    assert spec["plots"] == [{"x": "seed", "y": None, "series": [], "facets": ["repair.method"], "title": None}]
    assert spec["tables"] == [{"group_by": ["repair.method"], "metrics": [], "title": "t"}]
    assert "tables" not in expand({"overrides": {"output_dir": str(tmp_path)}, "grid": {"seed": [1]}}).spec()


def _faceted_sweep(out: Path) -> None:
    """Sweep ``fac`` in ``out``: sft/vaccine x p 0/0.1 x repair none/antidote x seeds 1, 2, declaring a
    faceted plot and one table (HS per method and repair)."""
    spec = {"axes": [{"fields": [f]} for f in ("align.method", "finetune.p", "repair.method", "seed")],
            "plots": [{"x": "finetune.p", "series": ["align.method"], "facets": ["repair.method"]}],
            "tables": [{"group_by": ["align.method", "repair.method"], "metrics": ["harmful_score/*"],
                        "title": "HS per method and repair"}]}
    with ResultStore.in_dir(out) as store:
        store.record_sweep("fac", "fac.yaml", spec)
        i = 0
        for method in ("sft", "vaccine"):
            for p in (0.0, 0.1):
                for repair in ("none", "antidote"):
                    for seed in (1, 2):
                        swept = {"align.method": method, "finetune.p": p, "repair.method": repair, "seed": seed}
                        cfg = load_config(overrides=[f"{k}={v}" for k, v in swept.items()])
                        hs = _hs(method, p, seed) - (10 if repair == "antidote" else 0)
                        store.record_run(RunRecord(f"f{i}", cfg.model_dump(mode="json"), swept, seed),
                                         {"harmful_score/keyword": hs, "harmful_prompts": 100,
                                          "finetune_accuracy/strict": 80.0}, sweep="fac", position=i)
                        i += 1


def test_results_shows_a_sweeps_declared_tables_unless_asked_for_other_columns(tmp_path):
    out = tmp_path / "runs"
    _faceted_sweep(out)
    shown = CliRunner().invoke(app, ["results", "-o", str(out), "-s", "fac"])
    assert shown.exit_code == 0, shown.output
    assert "HS per method and repair: 16 runs" in shown.output
    assert re.search(r"sft\s+│\s+none\s+│\s+4\s+│\s+1,2\s+│\s+46\.50 ± 5\.80 \[41\.7, 51\.4\]", shown.output)
    assert "finetune_accuracy/strict" not in shown.output and "finetune.p" not in shown.output
    grouped = CliRunner().invoke(app, ["results", "-o", str(out), "-s", "fac", "-g", "finetune.p"])
    assert grouped.exit_code == 0 and "HS per method" not in grouped.output
    assert "finetune.p" in grouped.output and "finetune_accuracy/strict" in grouped.output


def test_report_renders_declared_tables_and_faceted_plots(tmp_path, saved_figures):
    """A declared table replaces the default one (its rows: the group_by combinations, averaged over the
    rest); a faceted plot is one figure with a panel per facet value, each the plot on that subset."""
    out = tmp_path / "runs"
    _faceted_sweep(out)
    report = rp.build_report(out, tmp_path / "report")
    md, page = report.markdown.read_text(), report.html.read_text()
    # sft without repair: 41, 42 (p = 0) and 51, 52 (p = 0.1), 186 of 400 answers pooled; vaccine with: 66
    assert "**HS per method and repair**" in md and "<strong>HS per method and repair</strong>" in page
    assert "| align.method | repair.method | n | seeds | harmful_score/keyword |" in md
    assert "| sft | none | 4 | 1,2 | 46.50 ± 5.80 [41.7, 51.4] |" in md
    assert "| vaccine | antidote | 4 | 1,2 | 16.50 ± 5.80 [13.2, 20.5] |" in md
    assert "<td>sft</td><td>none</td><td class=\"num\">4</td>" in page
    assert "finetune_accuracy/strict |" not in md.split("<details>")[0]  # the declared columns only
    assert "| sft | 0 | none |" not in md.split("<details>")[0]  # no default table

    assert [p.name for p in report.figures] == ["fac-hs-vs-finetune-p-by-repair-method.png"]
    assert report.figures[0].exists()
    (fig,) = saved_figures
    assert [ax.get_title() for ax in fig.axes] == ["repair.method=none", "repair.method=antidote"]
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
    for ax, offset in zip(fig.axes, (0, -10)):
        handles, labels = ax.get_legend_handles_labels()
        lines = {label: (list(h[0].get_xdata()), list(h[0].get_ydata())) for h, label in zip(handles, labels)}
        assert lines == {"sft": ([0.0, 0.1], [41.5 + offset, 51.5 + offset]),
                         "vaccine": ([0.0, 0.1], [21.5 + offset, 31.5 + offset])}
