"""Harmful Score and Finetune Accuracy of a model, with a per-sample log."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from alignshield.config import RunConfig
from alignshield.data.pools import Example, load_pool
from alignshield.data.templates import render_prompt
from alignshield.evaluate.generate import generate
from alignshield.evaluate.judges import make_judge
from alignshield.tasks import TASKS


def evaluate_model(model: torch.nn.Module, tokenizer, cfg: RunConfig) -> tuple[dict[str, Any], list[dict]]:
    """Returns (metrics, samples). HS = 100 * flagged / answered, per judge; FA = task metric in %."""
    ev = cfg.evaluate
    special = cfg.template == "alpaca"
    harmful = load_pool(ev.harmful)
    answers = generate(model, tokenizer, [render_prompt(e, cfg.template, tokenizer) for e in harmful],
                       max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                       add_special_tokens=special, desc="harmful prompts")
    samples = [{"kind": "harmful", "prompt": e.prompt, "answer": a, "verdicts": {}} for e, a in zip(harmful, answers)]
    metrics: dict[str, Any] = {"harmful_prompts": len(harmful)}
    for name in ev.judges:
        judge = make_judge(name, ev.judge_options.get(name))
        verdicts = judge.judge([e.prompt for e in harmful], answers)
        for s, v in zip(samples, verdicts):
            s["verdicts"][name] = {"flagged": v.flagged, "score": v.score, "label": v.label}
        metrics[f"harmful_score/{name}"] = round(100.0 * sum(v.flagged for v in verdicts) / len(verdicts), 2)
        for label, count in sorted(Counter(v.label for v in verdicts).items()):
            metrics[f"answers/{name}/{label}"] = round(100.0 * count / len(verdicts), 2)

    task = TASKS.get(cfg.finetune.task)
    rows = task.rows("test")[: ev.task_n]
    examples: list[Example] = [task.to_example(r) for r in rows]
    task_answers = generate(model, tokenizer, [render_prompt(e, cfg.template, tokenizer) for e in examples],
                            max_new_tokens=ev.task_max_new_tokens or task.max_new_tokens,
                            batch_size=ev.batch_size, add_special_tokens=special, desc=f"{task.name} test")
    totals: Counter = Counter()
    for e, row, a in zip(examples, rows, task_answers):
        scores = task.score(a, row)
        totals.update(scores)
        samples.append({"kind": task.name, "prompt": e.prompt, "input": e.input, "answer": a,
                        "reference": e.response, "scores": scores})
    for k, v in totals.items():
        metrics[f"finetune_accuracy/{k}"] = round(100.0 * v / len(rows), 2)
    metrics["task_examples"] = len(rows)
    return metrics, samples
