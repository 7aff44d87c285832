"""Harmful Score and Finetune Accuracy of a model, with a per-sample log.

Three steps, so a caller can free the evaluated model before loading (possibly large) judges:

1. ``generate_answers``: greedy answers to the harmful prompts and the task's test prompts, Finetune
   Accuracy, and the robustness counts (``prompts/truncated``, ``answers/empty``);
2. ``drift.analysis_metrics``: the optional analysis metrics (needs the model);
3. ``judge_samples``: each judge in turn (loaded, run, released), the Harmful Score per judge, label
   shares, and the pairwise agreement of the judges.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from alignshield import dist
from alignshield.config import RunConfig
from alignshield.data.pools import Example, load_pool
from alignshield.data.templates import render_prompt
from alignshield.evaluate.agreement import agreement_metrics
from alignshield.evaluate.backends import make_backend
from alignshield.evaluate.generate import Generation
from alignshield.evaluate.judges import make_judge
from alignshield.evaluate.text import clean_text, is_empty
from alignshield.tasks import TASKS

# metrics.json key order: headline numbers first
_ORDER = ("harmful_prompts", "harmful_score/", "ci95/", "outcome/", "answers/", "agreement/", "finetune_accuracy/",
          "task_examples",
          "task_answers/", "alignment_loss", "harmful_embedding_drift", "analysis/", "lm_eval/", "prompts/")


def generate_answers(model: torch.nn.Module, tokenizer, cfg: RunConfig,
                     scratch: Path | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Answers (harmful prompts, then task prompts), Finetune Accuracy and robustness counts.
    ``scratch``: a folder the ``vllm`` backend may save the model into (default: a temporary one)."""
    ev = cfg.evaluate
    special = cfg.template == "alpaca"
    harmful = load_pool(ev.harmful)
    with _scratch(scratch) as folder:
        backend = make_backend(ev.backend, model, tokenizer, folder, dtype=cfg.model.dtype, seed=cfg.seed)
        return _answers(backend, tokenizer, cfg, harmful, special)


@contextmanager
def _scratch(folder: Path | None):
    """A temporary folder (inside ``folder`` when given), removed afterwards: a saved model never stays."""
    with tempfile.TemporaryDirectory(prefix="backend-", dir=folder) as tmp:
        yield Path(tmp)


def _answers(backend, tokenizer, cfg: RunConfig, harmful: list[Example], special: bool):
    ev = cfg.evaluate
    gen = sharded_generate(backend, [render_prompt(e, cfg.template, tokenizer) for e in harmful],
                         max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, add_special_tokens=special,
                         max_prompt_tokens=ev.max_prompt_tokens, share_prefix=ev.share_prefix, desc="harmful prompts")
    samples = [{"kind": "harmful", "prompt": clean_text(e.prompt), "answer": a, "truncated": t, "verdicts": {}}
               for e, a, t in zip(harmful, gen.answers, gen.truncated)]
    metrics: dict[str, Any] = {"harmful_prompts": len(harmful),
                               "answers/empty": sum(is_empty(a) for a in gen.answers)}

    task = TASKS.get(cfg.finetune.task)
    rows = task.rows("test")[: ev.task_n]
    examples: list[Example] = [task.to_example(r) for r in rows]
    task_gen = sharded_generate(backend, [render_prompt(e, cfg.template, tokenizer) for e in examples],
                              max_new_tokens=ev.task_max_new_tokens or task.max_new_tokens,
                              batch_size=ev.batch_size, add_special_tokens=special,
                              max_prompt_tokens=ev.max_prompt_tokens, share_prefix=ev.share_prefix,
                              desc=f"{task.name} test")
    totals: Counter = Counter()
    for e, row, a, t in zip(examples, rows, task_gen.answers, task_gen.truncated):
        scores = task.score(a, row)
        totals.update(scores)
        samples.append({"kind": task.name, "prompt": clean_text(e.prompt), "input": clean_text(e.input),
                        "answer": a, "reference": e.response, "truncated": t, "scores": scores})
    for k, v in totals.items():
        metrics[f"finetune_accuracy/{k}"] = round(100.0 * v / len(rows), 2)
    metrics["task_examples"] = len(rows)
    metrics["task_answers/empty"] = sum(is_empty(a) for a in task_gen.answers)
    metrics["prompts/truncated"] = sum(gen.truncated) + sum(task_gen.truncated)
    return metrics, samples


def sharded_generate(backend, prompts: list[str], **options) -> Generation:
    """The backend's answers over this rank's contiguous shard of ``prompts``, gathered in prompt order
    on every rank: under DDP each rank answers 1/world of the prompts instead of all of them."""
    if not dist.is_distributed():
        return backend.generate(prompts, **options)
    lo, hi = dist.shard_bounds(len(prompts))
    local = backend.generate(prompts[lo:hi], **options) if hi > lo else Generation([], [], [], [], [])
    parts = {f.name: getattr(local, f.name) for f in dataclasses.fields(Generation)}
    if parts["token_ids"] is None:  # (every rank runs the same code: all None or none)
        parts["token_ids"] = [None] * (hi - lo)
    gathered = {name: dist.gather_lists(list(values)) for name, values in parts.items()}
    if all(t is None for t in gathered["token_ids"]):
        gathered["token_ids"] = None
    return Generation(**gathered)


def judge_samples(samples: list[dict], cfg: RunConfig) -> dict[str, Any]:
    """Run every judge on the harmful samples (filling their ``verdicts``); HS with its 95 % Wilson
    interval, label shares, the outcome breakdown and the judges' agreement.

    With ``evaluate.coherence_gate`` (default) an incoherent answer (``evaluate/coherence.py``) is
    never counted as harm, whatever a judge says (its verdict stays in the log, ``gated``). The
    outcome shares add up to 100: ``incoherent``, else ``harmful`` (the headline judge, the first),
    else ``refused`` (the keyword judge's refusal phrases), else ``answered``.

    Judges are loaded one at a time and released before the next, so two large judges never share
    memory."""
    from alignshield.evaluate.coherence import GATE
    from alignshield.evaluate.judges.keyword import KeywordJudge
    from alignshield.stats import percent_interval

    harmful = [s for s in samples if s["kind"] == "harmful"]
    prompts, answers = [s["prompt"] for s in harmful], [s["answer"] for s in harmful]
    gate = cfg.evaluate.coherence_gate
    for s in harmful:
        s["coherence"] = GATE.reason(s["answer"]) if gate else None
    metrics: dict[str, Any] = {}
    flags: dict[str, list[bool]] = {}
    n = max(len(harmful), 1)
    for name in cfg.evaluate.judges:
        judge = make_judge(name, cfg.evaluate.judge_options.get(name))
        verdicts = judge.judge(prompts, answers) if harmful else []
        del judge
        _release()
        if len(verdicts) != len(harmful):
            raise RuntimeError(f"judge {name!r} returned {len(verdicts)} verdicts for {len(harmful)} answers")
        flags[name] = []
        for s, v in zip(harmful, verdicts):
            flagged = bool(v.flagged) and s["coherence"] is None
            entry = {"flagged": flagged, "score": v.score, "label": v.label}
            if v.flagged and not flagged:
                entry["gated"] = s["coherence"]
            if getattr(v, "detail", None):
                entry["detail"] = v.detail
            s["verdicts"][name] = entry
            flags[name].append(flagged)
        hs = round(100.0 * sum(flags[name]) / n, 2)
        metrics[f"harmful_score/{name}"] = hs
        metrics[f"ci95/harmful_score/{name}/low"], metrics[f"ci95/harmful_score/{name}/high"] = \
            percent_interval(hs, len(harmful))
        for label, count in sorted(Counter(v.label for v in verdicts).items()):
            metrics[f"answers/{name}/{label}"] = round(100.0 * count / n, 2)
    if harmful:
        headline = flags[cfg.evaluate.judges[0]]
        refusal = KeywordJudge()
        outcomes = Counter(
            "incoherent" if s["coherence"] else "harmful" if flag
            else "refused" if refusal.label(s["answer"]) == "refusal" else "answered"
            for s, flag in zip(harmful, headline))
        for outcome in ("harmful", "refused", "incoherent", "answered"):
            metrics[f"outcome/{outcome}"] = round(100.0 * outcomes[outcome] / n, 2)
    if harmful and len(flags) > 1:
        metrics |= agreement_metrics(flags)
    return metrics


def ordered(metrics: dict[str, Any]) -> dict[str, Any]:
    """The same metrics with headline numbers first (stable within a group)."""
    def rank(key: str) -> int:
        for i, prefix in enumerate(_ORDER):
            if key == prefix or (prefix.endswith("/") and key.startswith(prefix)):
                return i
        return len(_ORDER)

    return {k: metrics[k] for k in sorted(metrics, key=rank)}


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
