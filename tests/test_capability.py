"""lm-evaluation-harness as an evaluate metric: a tiny local task on the tiny model, checked against an
independent computation of the same accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from alignshield import stages
from alignshield.config import ConfigError
from alignshield.evaluate import capability
from conftest import write_jsonl

pytest.importorskip("lm_eval")

QUESTIONS = [{"question": f"the quick brown fox {i}", "choices": ["jumps over", "is sorry", "the lazy dog"]}
             for i in range(7)]
TASK = "alignshield_tiny_choice"


def write_task(folder, answers: list[int]):
    folder.mkdir(exist_ok=True)
    data = write_jsonl(folder / "tiny.jsonl", [q | {"answer": a} for q, a in zip(QUESTIONS, answers)])
    (folder / "tiny.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
        encoding="utf-8")
    return folder


@pytest.fixture
def task_dir(tmp_path):
    return write_task(tmp_path / "lm_tasks", [0] * len(QUESTIONS))


def predictions(model, tokenizer) -> list[int]:
    """lm-eval's multiple-choice rule computed by hand: the choice (after a space) with the highest
    summed log-likelihood of its tokens given the question."""
    chosen = []
    for q in QUESTIONS:
        context = tokenizer(q["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in q["choices"]:
            whole = tokenizer(q["question"] + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        chosen.append(max(range(len(scores)), key=scores.__getitem__))
    return chosen


def test_lm_eval_task_runs_on_the_evaluated_model(make_cfg, tmp_path):
    plain = make_cfg("evaluate.judges=[keyword]")
    stages.run(plain)
    model, tokenizer = stages.final_model(plain)
    chosen = predictions(model.eval(), tokenizer)
    # answers that agree with the hand-computed choice on 4 of 7 questions: lm-eval must score 4/7
    answers = [c if i < 4 else (c + 1) % 3 for i, c in enumerate(chosen)]
    folder = write_task(tmp_path / "lm_tasks", answers)
    cfg = make_cfg(f"evaluate.metrics=[lm-eval:{TASK}]", f"evaluate.lm_eval.include_path={folder}",
                   "evaluate.judges=[keyword]")
    metrics = stages.run(cfg)
    assert metrics[f"lm_eval/{TASK}/samples"] == len(QUESTIONS)
    assert metrics[f"lm_eval/{TASK}/acc"] == pytest.approx(4 / 7, abs=1e-6)
    assert "harmful_score/keyword" in metrics  # beside, not instead of, the harmful score
    # the settings are part of the evaluation's key only when they differ from the defaults
    assert "lm_eval" not in stages._key(plain.evaluate) and "lm_eval" in stages._key(cfg.evaluate)


def test_lm_eval_mistakes_fail_before_any_compute(make_cfg, task_dir, monkeypatch):
    with pytest.raises(ConfigError, match="unknown metric 'lmeval:mmlu'.*lm-eval:TASK"):
        make_cfg("evaluate.metrics=[lmeval:mmlu]")
    with pytest.raises(ConfigError, match="Did you mean 'alignment_loss'"):
        make_cfg("evaluate.metrics=[alignment_los]")
    monkeypatch.setattr(stages, "align", lambda cfg: pytest.fail("trained before the check"))
    typo = make_cfg(f"evaluate.metrics=[lm-eval:{TASK}x]", f"evaluate.lm_eval.include_path={task_dir}")
    with pytest.raises(ConfigError, match=f"no task '{TASK}x'.*Close: {TASK}"):
        stages.run(typo)
    missing = make_cfg(f"evaluate.metrics=[lm-eval:{TASK}]", f"evaluate.lm_eval.include_path={task_dir}/nope")
    with pytest.raises(ConfigError, match="include_path.*no such folder"):
        stages.run(missing)
    real_find_spec = capability.importlib.util.find_spec
    monkeypatch.setattr(capability.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"lm-eval is not installed: pip install 'alignshield\[lm-eval\]'"):
        stages.run(make_cfg(f"evaluate.metrics=[lm-eval:{TASK}]"))


def test_flatten_names_filters_and_drops_non_numbers():
    flat = capability.flatten(
        {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                   "acc,none": 1, "acc_stderr,none": "N/A", "flag,none": True}},
        {"gsm8k": {"original": 10, "effective": 4}})
    assert flat == {"lm_eval/gsm8k/exact_match/strict-match": 0.25, "lm_eval/gsm8k/exact_match_stderr/strict-match": 0.1,
                    "lm_eval/gsm8k/acc": 1.0, "lm_eval/gsm8k/samples": 4}
