"""Evaluation: agreement (kappa), robustness (truncation, empty answers, bad text), the analysis
metrics, and an end-to-end run with two judges. Tiny models built in code; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from alignshield import stages
from alignshield.config import ConfigError, load_config
from alignshield.evaluate import drift
from alignshield.evaluate.agreement import agreement_metrics, cohen_kappa, percent_agreement
from alignshield.evaluate.generate import encode_prompts, generate_batch, safe_decode
from alignshield.evaluate.judges import JUDGES, JudgeLoadError, Verdict
from alignshield.evaluate.metrics import generate_answers, judge_samples

from conftest import make_model, make_tokenizer, tiny_run_config


@pytest.fixture
def tokenizer():
    """The tiny tokenizer as alignshield's loader returns it (pad = end token)."""
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    return tok

# ------------------------------------------------------------------------------------ agreement


def test_kappa_hand_computed():
    # Wikipedia's worked example: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert percent_agreement(a, b) == pytest.approx(70.0)
    # p_o = 3/4, p_a = 1/2, p_b = 1/4, p_e = 1/8 + 3/8 = 1/2 -> kappa = 1/2
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert cohen_kappa([1, 0], [0, 1]) == -1.0
    # p_o = 1/2 and p_e = 1/2 (one rater says yes to half, the other to all): no better than chance
    assert cohen_kappa([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0


def test_kappa_undefined_and_bad_input():
    assert cohen_kappa([0, 0, 0], [0, 0, 0]) is None  # p_e = 1: one label everywhere
    assert percent_agreement([0, 0, 0], [0, 0, 0]) == 100.0
    with pytest.raises(ValueError, match="different numbers"):
        cohen_kappa([1, 0], [1])
    with pytest.raises(ValueError, match="at least one"):
        cohen_kappa([], [])


def test_agreement_metrics_every_pair_in_order():
    out = agreement_metrics({"keyword": [1, 1, 0, 0], "x": [1, 0, 0, 0], "y": [0, 0, 0, 0]})
    assert list(out) == [
        "agreement/keyword~x/kappa", "agreement/keyword~x/percent",
        "agreement/keyword~y/kappa", "agreement/keyword~y/percent",
        "agreement/x~y/kappa", "agreement/x~y/percent",
    ]
    assert out["agreement/keyword~x/kappa"] == 0.5 and out["agreement/keyword~x/percent"] == 75.0
    assert out["agreement/x~y/kappa"] == 0.0 and out["agreement/x~y/percent"] == 75.0


# ------------------------------------------------------------------------------------ robustness


def test_long_prompts_are_cut_from_the_left(tokenizer):
    long = "the quick brown fox " * 30 + "### Response:\n"
    ids, cut = encode_prompts(tokenizer, ["short", long, "<|endoftext|>" + long], True, 24)
    assert cut == [False, True, True]
    assert [len(i) for i in ids] == [len(tokenizer("short").input_ids), 24, 24]
    assert tokenizer.decode(ids[1]).endswith("### Response:\n")  # the end of the template is kept
    assert ids[2][0] == tokenizer.eos_token_id  # and so is a leading special token
    assert encode_prompts(tokenizer, [long], True, None)[1] == [False]


def test_generation_reports_truncation_and_token_counts(tokenizer):
    model = make_model("llama")
    long = "the quick brown fox " * 30
    gen = generate_batch(model, tokenizer, ["hello", long], max_new_tokens=3, batch_size=2,
                         max_prompt_tokens=20, progress=False)
    assert gen.truncated == [False, True] and gen.prompt_tokens[1] == 20
    assert all(0 < n <= 3 for n in gen.new_tokens) and all(isinstance(a, str) for a in gen.answers)


def test_decode_failures_and_bad_text_never_crash(monkeypatch, tokenizer):
    tok = tokenizer

    def broken_batch(*_a, **_k):
        raise UnicodeDecodeError("utf-8", b"\xe2", 0, 1, "invalid start byte")

    original = tok.decode
    monkeypatch.setattr(tok, "batch_decode", broken_batch)
    monkeypatch.setattr(tok, "decode", lambda ids, **k: broken_batch() if len(ids) > 1 or ids == [7] else
                        original(ids, **k))
    assert safe_decode(tok, [[5, 7, 9]]) == [original([5]) + "\ufffd" + original([9])]
    answers = generate_batch(make_model("llama"), tok, ["a lone surrogate \ud800 in a prompt"], max_new_tokens=3,
                             progress=False).answers
    assert isinstance(answers[0], str)
    json.dumps(answers, ensure_ascii=False).encode("utf-8")  # writable as samples.jsonl


@pytest.fixture
def small_cfg(tmp_path):
    return load_config(overrides=[
        f"output_dir={tmp_path}", "evaluate.harmful.stop=3", "evaluate.task_n=2", "evaluate.max_new_tokens=4",
        "evaluate.max_prompt_tokens=16", "align.data.safety.stop=6", "align.train.max_length=48",
    ])


def test_empty_answers_are_counted_and_judged_without_crash(tokenizer, small_cfg):
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy picks id 0, the end token -> empty answers
    assert tokenizer.eos_token_id == 0
    metrics, samples = generate_answers(model, tokenizer, small_cfg)
    assert metrics["answers/empty"] == 3 and metrics["task_answers/empty"] == 2
    assert metrics["prompts/truncated"] == 5  # every Alpaca-templated prompt exceeds 16 tokens
    assert all(s["truncated"] and s["answer"] == "" for s in samples)
    judged = judge_samples(samples, small_cfg)
    assert judged["harmful_score/keyword"] == 0.0 and judged["answers/keyword/incoherent"] == 100.0
    assert judged["outcome/incoherent"] == 100.0 and judged["ci95/harmful_score/keyword/high"] > 0


def test_config_validates_metrics_and_judges():
    assert load_config().evaluate.metrics == [] and load_config().evaluate.max_prompt_tokens == 1024
    with pytest.raises(ConfigError, match="evaluate.metrics"):
        load_config(overrides=["evaluate.metrics=[alignment_los]"])
    with pytest.raises(ConfigError, match="more than once"):
        load_config(overrides=["evaluate.judges=[keyword,keyword]"])
    with pytest.raises(ConfigError, match="at least one judge"):
        load_config(overrides=["evaluate.judges=[]"])


# ------------------------------------------------------------------------------------ analysis metrics


def test_drift_is_zero_for_identical_models_and_positive_otherwise(tokenizer, small_cfg):
    cfg = small_cfg.model_copy(update={"evaluate": small_cfg.evaluate.model_copy(
        update={"metrics": ["alignment_loss", "harmful_embedding_drift"], "analysis_n": 4})})
    aligned = make_model("llama", seed=0)
    reference = drift.reference_states(aligned, tokenizer, cfg)
    assert len(reference) == 4 and reference[0].shape[-1] == 32
    same = drift.analysis_metrics(make_model("llama", seed=0), tokenizer, cfg, reference)
    assert same["harmful_embedding_drift"] == 0.0 and same["analysis/examples"] == 4
    other = make_model("llama", seed=0)
    with torch.no_grad():
        other.model.layers[-1].mlp.down_proj.weight.add_(0.05)
    moved = drift.analysis_metrics(other, tokenizer, cfg, reference)
    assert moved["harmful_embedding_drift"] > 0
    assert 0 < same["alignment_loss"] < 20 and moved["alignment_loss"] != same["alignment_loss"]
    # the loss is the mean CE over answer tokens: ln(vocab) for a model that predicts uniformly
    uniform = make_model("llama")
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    only_loss = cfg.evaluate.model_copy(update={"metrics": ["alignment_loss"]})
    loss = drift.analysis_metrics(uniform, tokenizer, cfg.model_copy(update={"evaluate": only_loss}))
    assert loss["alignment_loss"] == pytest.approx(torch.log(torch.tensor(320.0)).item(), rel=1e-5)
    with pytest.raises(ValueError, match="aligned model"):
        drift.analysis_metrics(other, tokenizer, cfg, None)


# ------------------------------------------------------------------------------------ end to end

LOAD_FAILS = {"now": False}


class LongAnswerJudge:
    """Test judge: flags answers of 3 or more words."""

    name = "test-long-answer"

    def __init__(self):
        if LOAD_FAILS["now"]:
            raise OSError("weights not reachable")

    def judge(self, prompts, answers):
        return [Verdict(flagged=len(a.split()) >= 3, score=None, label="long" if len(a.split()) >= 3 else "short")
                for a in answers]


@pytest.fixture
def test_judge():
    JUDGES.register(LongAnswerJudge.name)(LongAnswerJudge)
    yield LongAnswerJudge.name
    JUDGES._entries.pop(LongAnswerJudge.name)
    LOAD_FAILS["now"] = False


def e2e_cfg(tiny_model_dir, tmp_path, *extra):
    return tiny_run_config(tiny_model_dir, tmp_path, "evaluate.harmful.stop=6", "evaluate.task_n=3",
                           "evaluate.max_new_tokens=6", "evaluate.analysis_n=4", *extra)


def test_run_with_two_judges_reports_agreement_and_analysis(tiny_model_dir, tmp_path, test_judge, monkeypatch):
    cfg = e2e_cfg(tiny_model_dir, tmp_path, f"evaluate.judges=[keyword,{test_judge}]",
                  "evaluate.metrics=[alignment_loss,harmful_embedding_drift]")
    LOAD_FAILS["now"] = True  # the second judge cannot load: the run fails after generation ...
    with pytest.raises(JudgeLoadError, match=f"judge '{test_judge}' could not load: OSError: weights not reachable"):
        stages.run(cfg)
    assert (stages.answers_dir(cfg) / stages.ANSWERS_FILE).exists()
    LOAD_FAILS["now"] = False  # ... and the rerun reuses the saved answers instead of generating again
    from alignshield.evaluate import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "generate_answers", lambda *a: pytest.fail("generated twice"))
    metrics = stages.run(cfg)
    pair = f"agreement/keyword~{test_judge}"
    assert {f"{pair}/kappa", f"{pair}/percent", f"harmful_score/{test_judge}", "harmful_score/keyword",
            "alignment_loss", "harmful_embedding_drift", "prompts/truncated", "answers/empty"} <= set(metrics)
    assert metrics["harmful_embedding_drift"] > 0  # the fine-tune moved the model away from the aligned one
    assert 0 <= metrics[f"{pair}/percent"] <= 100
    out = stages.stage_dirs(cfg)["evaluate"]
    assert not (out / stages.GENERATED_FILE).exists()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    harmful = [s for s in samples if s["kind"] == "harmful"]
    assert len(harmful) == 6 and all(set(s["verdicts"]) == {"keyword", test_judge} for s in harmful)
    flags = {name: [s["verdicts"][name]["flagged"] for s in harmful] for name in ("keyword", test_judge)}
    assert metrics[f"{pair}/percent"] == round(percent_agreement(*flags.values()), 2)


@pytest.mark.parametrize("option, error", [
    ("evaluate.judge_options.keyword.min_word=3", "did you mean 'min_words'"),
    ("evaluate.judge_options.embedded.threshold=1.5", "judge_options.embedded.threshold: .*less than or equal"),
])
def test_bad_judge_options_fail_before_any_training(tiny_model_dir, tmp_path, option, error):
    cfg = e2e_cfg(tiny_model_dir, tmp_path, "evaluate.judges=[embedded,keyword]", option)
    with pytest.raises(ConfigError, match=error):
        stages.run(cfg)
    assert not (tmp_path / "align").exists()


# ------------------------------------------------------------------ generation backends (evaluate/backends.py)


class FakeVLLM:
    """vLLM's interface (LLM, SamplingParams) answering with transformers' greedy ``generate`` on the
    token ids it is given, from the saved model folder: what a faithful backend adapter must match."""

    calls: list = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, model, tokenizer, dtype, seed):
            from transformers import AutoModelForCausalLM

            FakeVLLM.calls.append({"model": model, "dtype": dtype, "seed": seed})
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

        def generate(self, prompts, params):
            assert params.temperature == 0.0 and params.n == 1
            FakeVLLM.calls.append({"prompts": prompts, "max_tokens": params.max_tokens, "stop": params.stop_token_ids})
            outs = []
            for p in prompts:
                ids = torch.tensor([p["prompt_token_ids"]])
                with torch.no_grad():
                    row = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                                              do_sample=False, eos_token_id=params.stop_token_ids,
                                              pad_token_id=params.stop_token_ids[0])[0, ids.shape[1]:].tolist()
                cut = next((i + 1 for i, t in enumerate(row) if t in params.stop_token_ids), len(row))
                outs.append(type("Out", (), {"outputs": [type("Seq", (), {"token_ids": row[:cut]})()]})())
            return outs


def test_vllm_backend_gives_the_hf_backends_answers(monkeypatch, tokenizer, tmp_path):
    import sys
    import types

    from alignshield.evaluate.backends import HFBackend, make_backend
    from conftest import make_model

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeVLLM.LLM, SamplingParams=FakeVLLM.SamplingParams))
    FakeVLLM.calls.clear()
    model = make_model("llama", layers=2)
    prompts = ["Below is an instruction", "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9", "negative"]
    options = dict(max_new_tokens=6, batch_size=2, add_special_tokens=True, max_prompt_tokens=12, progress=False)
    want = HFBackend(model, tokenizer).generate(prompts, **options)
    got = make_backend("vllm", model, tokenizer, tmp_path, dtype="float32", seed=3).generate(prompts, **options)
    assert got == want
    assert FakeVLLM.calls[0] == {"model": str(tmp_path / "model"), "dtype": "float32", "seed": 3}
    assert any(want.truncated) and FakeVLLM.calls[1]["max_tokens"] == 6  # token ids given, already cut


def test_vllm_backend_is_checked_before_compute(make_cfg, monkeypatch):
    import importlib.util

    from alignshield import stages
    from alignshield.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install vllm"):
        stages.validate(make_cfg("evaluate.backend=vllm"))
    assert stages.stage_dirs(make_cfg("evaluate.backend=hf")) == stages.stage_dirs(make_cfg())  # the default's key
    assert stages.stage_dirs(make_cfg("evaluate.backend=vllm"))["evaluate"] != stages.stage_dirs(make_cfg())["evaluate"]
