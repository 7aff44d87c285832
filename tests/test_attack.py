"""The adaptive attacker (experiments/attack.py) and full-parameter fine-tuning, on the tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from alignshield.config import ConfigError
from alignshield.experiments import attack as at
from alignshield.experiments.store import ResultStore
from conftest import TINY_RUN

SPACE = {"finetune.train.learning_rate": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
         "finetune.p": [0.0, 0.5], "finetune.lora.r": [2, 4]}


def _attack(tmp_path, tiny_model_dir, out="runs", **spec):
    """An Attack on the tiny run (keyword judge only, for speed) writing into ``tmp_path/out``."""
    data = {"trials": 3, "epsilon": 100.0, "startup_trials": 2, "space": SPACE} | spec
    path = tmp_path / "tiny-attack.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded, source = at.load_attack(path)
    overrides = [f"model.name={tiny_model_dir}", f"output_dir={tmp_path / out}", *TINY_RUN,
                 "evaluate.judges=[keyword]"]
    return at.Attack(loaded, source, overrides=overrides)


def _trials(result: at.AttackResult) -> list[tuple]:
    return [(t.params, t.objective, t.utility, t.run_key) for t in result.trials]


def test_search_is_deterministic_and_a_killed_search_resumes_to_the_same_trials(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    full = _attack(tmp_path, tiny_model_dir, "full").run()
    assert len(full.trials) == 3
    assert len({json.dumps(t.params, sort_keys=True) for t in full.trials}) == 3  # the search moved

    again = _attack(tmp_path, tiny_model_dir, "again").run()  # a fresh folder, same seed: same search
    assert [(t.params, t.objective) for t in again.trials] == [(t.params, t.objective) for t in full.trials]

    # kill the second trial mid-run (BaseException: nothing catches it, the trial stays RUNNING,
    # as after kill -9), then resume in the same folder
    from alignshield import stages

    real, calls = stages.run, []

    def dying(cfg):
        calls.append(cfg)
        if len(calls) == 3:  # 1: the reference run, 2: trial 0, 3: trial 1
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(stages, "run", dying)
    cut = _attack(tmp_path, tiny_model_dir, "cut")
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    monkeypatch.setattr(stages, "run", real)
    import optuna

    states = [t.state.name for t in optuna.load_study(study_name=cut.study, storage=f"sqlite:///{cut.storage_path}")
              .get_trials(deepcopy=False)]
    assert states == ["COMPLETE", "RUNNING"]
    resumed = _attack(tmp_path, tiny_model_dir, "cut").run()
    assert [(t.params, t.objective, t.utility) for t in resumed.trials] == \
        [(t.params, t.objective, t.utility) for t in full.trials]

    # one row per trial in the results database, its attack config as the swept fields
    with ResultStore.in_dir(tmp_path / "cut", readonly=True) as store:
        spec = store.sweeps()[cut.study]["spec"]
        runs = [r for r in store.runs(cut.study) if r.swept != {"attack": "reference"}]
    assert spec["kind"] == "attack" and spec["reference_run"] == resumed.reference_key
    assert sorted(r.run_key for r in runs) == sorted(t.run_key for t in resumed.trials)
    assert {json.dumps(r.swept, sort_keys=True) for r in runs} == \
        {json.dumps(t.params, sort_keys=True) for t in resumed.trials}

    # a larger budget extends the same study: the first trials are kept, one more is run
    more = at.Attack(cut.spec.replaced(trials=4), cut.source, overrides=cut._cli["overrides"]).run()
    assert _trials(more)[:3] == _trials(resumed) and len(more.trials) == 4

    # the report: worst case per epsilon (unbounded = the best trial), the curve, the summary row
    from alignshield.experiments.report import build_report

    report = build_report(tmp_path / "cut", tmp_path / "report", html_page=False)
    text = report.markdown.read_text(encoding="utf-8")
    assert "## attack summary" in text and "worst-case harmful_score/keyword" in text
    best = max(t.objective for t in more.trials)
    assert any(line.startswith(f"| unbounded | {best:g}") for line in text.splitlines())
    assert any(p.name.endswith("cumulative-max.png") for p in report.figures)


def test_cli_attack_dry_run_checks_everything_and_computes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from alignshield import stages
    from alignshield.cli import app

    monkeypatch.setattr(stages, "run", lambda cfg: pytest.fail("computed"))
    search = _attack(tmp_path, tiny_model_dir)
    args = ["attack", str(search.source), *search._cli["overrides"]]
    ok = CliRunner().invoke(app, [*args, "--dry-run"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, [*args, "--trials", "0"])
    assert bad.exit_code == 2 and "trials" in bad.output


def test_a_trial_over_the_utility_budget_is_never_the_worst_case():
    trials = [{"objective": 40.0, "utility": 50.0}, {"objective": 20.0, "utility": 84.0},
              {"objective": 30.0, "utility": 79.0}, {"objective": 25.0, "utility": 90.0}]
    assert at.worst_case(trials, 85.0, 5.0) == trials[3]  # 40 and 30 lost more than 5 points
    assert at.worst_case(trials, 85.0, 6.0) == trials[2]
    assert at.worst_case(trials, 85.0, 0.0) == trials[3]
    assert at.worst_case(trials, 85.0, 100.0) == trials[0]
    assert at.worst_case(trials, 100.0, 5.0) is None
    assert at.cumulative_max(trials, 80.0) == [None, 20.0, 20.0, 25.0]

    result = at.AttackResult("s", "ref", 85.0, 80.0, [
        at.Trial(i, {}, f"k{i}", t["objective"], t["utility"], t["utility"] >= 80.0, {}) for i, t in enumerate(trials)])
    assert result.worst.index == 3  # 40 (utility 50) and 30 (utility 79) are over the budget


def test_epsilon_zero_reports_only_trials_at_the_reference_accuracy(tmp_path, tiny_model_dir):
    result = _attack(tmp_path, tiny_model_dir, epsilon=0.0).run()
    assert all(t.feasible == (t.utility >= result.reference_utility) for t in result.trials)
    if result.worst is not None:
        assert result.worst.utility >= result.reference_utility


@pytest.mark.parametrize("change, message", [
    ({"space": {}}, "search space is empty"),
    ({"epsilon": -1.0}, "epsilon"),
    ({"trials": 0}, "trials"),
    ({"space": {"finetune.train.learning_rate": {"low": 1e-2, "high": 1e-4}}}, "must be below high"),
    ({"space": {"finetune.train.learning_rat": [1e-4]}}, "learning_rate"),  # a typo: the suggestion
    ({"space": {"finetune.p": [0.1, 1.5]}}, "finetune.p=1.5"),
    ({"space": {"finetune.topology": ["two-lora", "full"]}, "overrides": {"repair.method": "antidote"}},
     "finetune.topology=full trains every weight"),
    ({"space": {"seed": [1, 2]}}, "seed cannot be searched"),
])
def test_bad_attack_input_fails_before_any_compute(tmp_path, tiny_model_dir, monkeypatch, change, message):
    from alignshield import stages

    monkeypatch.setattr(stages, "run", lambda cfg: pytest.fail("computed before the error"))
    with pytest.raises(ConfigError, match=message) as err:
        _attack(tmp_path, tiny_model_dir, **change).run()
    assert "tiny-attack.yaml" in str(err.value)  # the file is named


def test_full_parameter_finetune_trains_every_weight_on_the_merged_alignment(make_cfg):
    from alignshield import stages
    from alignshield.models.lora import ADAPTER_DIR, MODEL_DIR

    cfg = make_cfg("finetune.topology=full", "repair.method=none")
    out = stages.finetune(cfg)
    assert (out / MODEL_DIR).exists() and not (out / ADAPTER_DIR).exists()
    tuned, _ = stages.final_model(cfg)
    aligned, _ = stages._aligned_model(cfg)
    base, _ = stages._base(cfg)
    tuned_p, aligned_p, base_p = (dict(m.named_parameters()) for m in (tuned, aligned, base))
    assert set(tuned_p) == set(aligned_p)  # no LoRA modules left: a plain model
    assert all(not torch.equal(tuned_p[n], aligned_p[n]) for n in aligned_p), "every weight tensor trains"

    # it starts from the aligned model (LoRA #1 merged): at a learning rate too small to move far, the
    # result is next to the aligned weights, not the base's
    tiny = make_cfg("finetune.topology=full", "finetune.train.learning_rate=1e-7")
    stages.finetune(tiny)
    start, _ = stages.final_model(tiny)
    start_p = dict(start.named_parameters())
    merged = [n for n in aligned_p if not torch.equal(aligned_p[n], base_p[n])]
    assert merged, "the alignment changed some weights"
    for n in merged:
        to_aligned = (start_p[n] - aligned_p[n]).abs().max().item()
        to_base = (start_p[n] - base_p[n]).abs().max().item()
        assert to_aligned < 1e-5 < to_base, n


def test_full_parameter_finetune_refuses_adapter_repairs(make_cfg):
    from alignshield import stages

    with pytest.raises(ConfigError, match="leaves no adapter"):
        stages.validate(make_cfg("finetune.topology=full", "repair.method=antidote"))


def test_the_shipped_attacks_load_and_name_their_spaces():
    assert {"embedded", "embedded-full"} <= set(at.known_attacks())
    for name in at.known_attacks():
        spec, _ = at.load_attack(name)
        assert spec.space and spec.trials > 0 and spec.description


# ------------------------------------------------------------------ benign-selection attacks


def _pairs(tokenizer, n, offset=0):
    from alignshield.data.collate import tokenize_pair
    from alignshield.data.pools import Example

    words = ["good", "bad", "fine film", "awful plot twist", "the quick brown fox", "lazy dog 1 2 3"]
    return [tokenize_pair(tokenizer, Example(f"Review {i}: {words[(i + offset) % 6]}", "",
                                             words[(i * 5 + offset) % 6] * (1 + i % 3)), "alpaca", 64)
            for i in range(n)]


@pytest.mark.parametrize("method", ["self-inf-n", "harmful-gradient"])
def test_selection_scores_equal_an_independent_computation(tokenizer, method):
    from alignshield.config import BenignSelection
    from alignshield.data.collate import IGNORE_INDEX
    from alignshield.finetune import select
    from alignshield.models.layers import discover
    from conftest import make_model

    model = make_model("llama", layers=2).double()
    layers = discover(model).layers
    candidates, anchors = _pairs(tokenizer, 5), _pairs(tokenizer, 3, offset=2)
    settings = BenignSelection(method=method, layers=1, anchors=3)
    got = select.scores(model, candidates, anchors, settings, layers, tokenizer.eos_token_id, progress=False)
    assert all(p.requires_grad for p in model.parameters()), "the trainable flags are restored"

    def grad(t):  # the plain way: model(...).loss, backward, read .grad of the last layer's weights
        model.zero_grad()
        ids = torch.tensor([t.input_ids])
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([t.labels])).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in layers[-1].parameters()])

    if method == "self-inf-n":
        want = [math.log(grad(t).pow(2).sum().item() + 1) + math.log(sum(x != IGNORE_INDEX for x in t.labels) + 1)
                for t in candidates]
    else:
        mean = torch.stack([grad(a) for a in anchors]).mean(0)
        want = [torch.nn.functional.cosine_similarity(grad(t), mean, dim=0).item() for t in candidates]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert select.top([1.0, 3.0, 3.0, 2.0], 3) == [1, 2, 3]


def test_selection_attack_fine_tunes_on_the_top_scored_benign_examples(make_cfg):
    from alignshield import stages
    from alignshield.tasks import TASKS

    cfg = make_cfg("finetune.select.method=self-inf-n", "finetune.select.candidates=30", "finetune.p=0.2")
    out = stages.finetune(cfg)
    report = json.loads((out / "stage.json").read_text())["report"]["select"]
    assert report["candidates"] == 30 and report["chosen"] == 8  # n = 10, round(0.2 * 10) = 2 harmful
    pool = TASKS.get("sst2").examples("train")
    chosen = {(pool[i].prompt, pool[i].input, pool[i].response) for i in report["chosen_rows"]}
    mix = [json.loads(line) for line in (out / "mix.jsonl").read_text().splitlines()]
    assert {(m["prompt"], m["input"], m["response"]) for m in mix if not m["harmful"]} == chosen
    assert sum(m["harmful"] for m in mix) == 2
    # a random selection keeps its key (stages computed before finetune.select existed stay valid)
    assert "select" not in stages._key(make_cfg().finetune) and "select" in stages._key(cfg.finetune)


def test_selection_needs_enough_candidates(make_cfg):
    from alignshield import stages

    with pytest.raises(ConfigError, match="finetune.select.candidates"):
        stages.validate(make_cfg("finetune.select.method=self-inf-n", "finetune.select.candidates=5"))


def test_a_combination_that_cannot_run_is_skipped_not_counted(tmp_path, tiny_model_dir):
    import optuna

    # every value is fine alone; self-inf-n at p = 0 would choose all n = 10 from 6 candidates
    space = {"finetune.select.method": ["random", "self-inf-n"], "finetune.p": [0.5, 0.0]}
    search = _attack(tmp_path, tiny_model_dir, space=space, trials=3, startup_trials=3,
                     overrides={"finetune.select.candidates": 6})
    result = search.run()
    assert len(result.trials) == 3
    assert all(t.params != {"finetune.select.method": "self-inf-n", "finetune.p": 0.0} for t in result.trials)
    failed = optuna.load_study(study_name=search.study, storage=f"sqlite:///{search.storage_path}").get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    assert failed and all("finetune.select.candidates" in t.user_attrs["invalid"] for t in failed)
    again = _attack(tmp_path, tiny_model_dir, "again", space=space, trials=3, startup_trials=3,
                    overrides={"finetune.select.candidates": 6}).run()
    assert [t.params for t in again.trials] == [t.params for t in result.trials]


@pytest.mark.parametrize("master", ["float32", "model"])
def test_full_parameter_finetune_in_bfloat16_keeps_float32_master_weights(make_cfg, master):
    """Updates far below bfloat16's resolution accumulate in float32 master weights (the default);
    trained in bfloat16 itself, each one rounds away and most weights never move."""
    from alignshield import stages
    from alignshield.train import Trainer

    cfg = make_cfg("model.dtype=bfloat16", "finetune.topology=full", "repair.method=none",
                   "finetune.train.learning_rate=2e-5", "finetune.train.max_steps=12",
                   f"finetune.master_weights={master}")
    seen = {}
    original = Trainer.autocast_dtype

    def spy(self):
        seen["autocast"] = original(self)
        seen["weights"] = {p.dtype for p in self.trainable}
        return seen["autocast"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "autocast_dtype", spy)
        stages.finetune(cfg)
    tuned, _ = stages.final_model(cfg)
    aligned, _ = stages._aligned_model(cfg)
    assert next(tuned.parameters()).dtype == torch.bfloat16  # saved and evaluated in the model's dtype
    aligned_p = dict(aligned.named_parameters())
    moved = sum(int((p != aligned_p[n]).sum()) for n, p in tuned.named_parameters())
    total = sum(p.numel() for p in aligned.parameters())
    if master == "float32":
        assert seen == {"autocast": torch.bfloat16, "weights": {torch.float32}}
        assert moved > 0.5 * total, (moved, total)
    else:
        assert seen == {"autocast": None, "weights": {torch.bfloat16}}
        assert moved < 0.5 * total, (moved, total)


def test_master_weights_leave_the_keys_of_lora_and_float32_fine_tunes_alone(make_cfg):
    from alignshield import stages

    base = stages.stage_dirs(make_cfg())["finetune"]
    for extra in (["finetune.master_weights=float32"], ["finetune.master_weights=model"]):
        assert stages.stage_dirs(make_cfg(*extra))["finetune"] == base  # LoRA: the choice changes nothing
    full32 = [stages.stage_dirs(make_cfg("finetune.topology=full", f"finetune.master_weights={m}"))["finetune"]
              for m in ("auto", "float32", "model")]
    assert len(set(full32)) == 1  # a float32 model trains float32 weights whatever the setting
    half = {m: stages.stage_dirs(make_cfg("model.dtype=bfloat16", "finetune.topology=full",
                                          f"finetune.master_weights={m}"))["finetune"]
            for m in ("auto", "float32", "model")}
    assert half["auto"] == half["float32"] != half["model"]
    assert stages.resolve(make_cfg("model.dtype=bfloat16", "finetune.topology=full")).finetune.master_weights \
        == "float32"
