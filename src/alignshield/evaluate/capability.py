"""Capability metrics from lm-evaluation-harness, on the evaluated model in memory (``evaluate.metrics``).

``evaluate.metrics=[lm-eval:mmlu,lm-eval:arc_easy]`` runs those lm-eval tasks on the model the
evaluation judges (the aligned base with the repaired fine-tune adapter merged), without saving it:
lm-eval's ``HFLM`` wraps the loaded model and tokenizer. So a result can report general utility
(MMLU-style accuracy) beside the fine-tune task's. Each task's metrics land in metrics.json as
``lm_eval/<task>/<metric>`` (a filter other than lm-eval's ``none`` is appended: ``.../exact_match/
strict-match``), with ``lm_eval/<task>/samples``.

lm-eval's own tasks load their datasets from the Hugging Face Hub (network needed). A task of your own,
on local files, is a YAML in a folder named by ``evaluate.lm_eval.include_path`` (docs/evaluation.md
has a 12-line example). ``pip install 'alignshield[lm-eval]'``.

Seeds: lm-eval's random, numpy, torch and few-shot seeds are all ``seed`` (the run's), so a rerun
draws the same few-shot examples. Under DDP every rank runs the tasks on its own copy of the model
(lm-eval's in-memory mode is single-process); rank 0's numbers are written.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from alignshield.config import LM_EVAL_PREFIX, ConfigError

INSTALL_HINT = "pip install 'alignshield[lm-eval]' (or pip install lm-eval)"


def tasks_of(metrics: list[str]) -> list[str]:
    """The lm-eval task names among ``evaluate.metrics`` (``lm-eval:TASK``), in order."""
    return [m[len(LM_EVAL_PREFIX):] for m in metrics if m.startswith(LM_EVAL_PREFIX)]


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Before any compute: lm-eval is installed, ``include_path`` exists and every task is known to it
    (lm-eval indexes its task folders, ~10 s once per process). Raises ConfigError with the fix."""
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"evaluate.metrics names lm-eval tasks ({', '.join(tasks)}), but lm-eval is not "
                         f"installed: {INSTALL_HINT}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"evaluate.lm_eval.include_path={include_path}: no such folder (it holds your task YAMLs)")
    known = _task_manager(include_path).all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=3)
        hint = f" Close: {', '.join(close)}." if close else ""
        where = f" or in {include_path}" if include_path else " (tasks of your own: evaluate.lm_eval.include_path)"
        raise ConfigError(f"evaluate.metrics: lm-eval has no task {unknown[0]!r}{where}.{hint} "
                         "List them with `lm-eval ls tasks`.")


def capability_metrics(model, tokenizer, tasks: list[str], settings, seed: int) -> dict[str, Any]:
    """Run the lm-eval ``tasks`` on ``model`` (in memory) and flatten their results into
    ``lm_eval/<task>/<metric>`` keys. ``settings``: ``evaluate.lm_eval`` (LmEvalSettings)."""
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
              device=str(next(model.parameters()).device))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
        task_manager=_task_manager(settings.include_path), log_samples=False, bootstrap_iters=settings.bootstrap_iters,
        apply_chat_template=settings.apply_chat_template, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    return flatten(out["results"], out.get("n-samples", {}))


def flatten(results: dict[str, dict[str, Any]], samples: dict[str, dict[str, int]]) -> dict[str, Any]:
    """lm-eval's ``results`` (``{task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}``) as flat
    metrics: numbers only ("N/A" stderrs dropped), lm-eval's default filter ``none`` left out of the name."""
    flat: dict[str, Any] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            flat[f"lm_eval/{task}/{name}"] = round(float(value), 6)
        if task in samples:
            flat[f"lm_eval/{task}/samples"] = samples[task].get("effective", samples[task].get("original"))
    return flat
