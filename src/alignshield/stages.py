"""The four stages as plain functions over a ``RunConfig``.

Each stage first runs whatever upstream stage is missing, then stores its own output in a folder
named by a hash of everything that determines it (``<output_dir>/<stage>/<method>-<key>``). A folder
that exists is complete (it is renamed into place only at the end, see ``io.atomic_dir``), so a rerun
or a sweep never recomputes finished work, and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from alignshield.align import ALIGN_METHODS
from alignshield.config import RunConfig, dump_yaml, stable_hash
from alignshield.data.collate import Tokenized, tokenize_pair
from alignshield.data.mix import build_mix
from alignshield.data.pools import Example, check_disjoint, load_pool
from alignshield.evaluate.judges import JUDGES
from alignshield.finetune import FINETUNE_METHODS
from alignshield.io import atomic_dir, write_json_atomic, write_jsonl_atomic, write_text_atomic
from alignshield.models.lora import ADAPTER_DIR, attach_lora, load_adapter, merge_adapter
from alignshield.repair import REPAIR_METHODS
from alignshield.tasks import TASKS

log = logging.getLogger(__name__)
STAGES = ("align", "finetune", "repair", "evaluate")


def resolve(cfg: RunConfig) -> RunConfig:
    """The config with every method's parameters spelled out, defaults included: what is hashed,
    saved next to each output and printed, so equal settings always map to the same folder."""
    cfg = cfg.model_copy(deep=True)
    for stage, registry in (("align", ALIGN_METHODS), ("finetune", FINETUNE_METHODS), ("repair", REPAIR_METHODS)):
        section = getattr(cfg, stage)
        section.params = section.resolved_params(registry).model_dump(mode="json")
    return cfg


def stage_dirs(cfg: RunConfig) -> dict[str, Path]:
    cfg = resolve(cfg)
    root = Path(cfg.output_dir)
    common = {"seed": cfg.seed, "template": cfg.template, "model": cfg.model.model_dump(mode="json")}
    a = stable_hash(common, cfg.align.model_dump(mode="json"))
    f = stable_hash(a, cfg.finetune.model_dump(mode="json"))
    r = stable_hash(f, cfg.repair.model_dump(mode="json"))
    e = stable_hash(r, cfg.evaluate.model_dump(mode="json"))
    return {
        "align": root / "align" / f"{cfg.align.method}-{a}",
        "finetune": root / "finetune" / f"{cfg.finetune.method}-{f}",
        "repair": root / "repair" / f"{cfg.repair.method}-{r}",
        "evaluate": root / "evaluate" / f"{cfg.finetune.task}-{e}",
    }


def validate(cfg: RunConfig) -> None:
    """Fail before any compute: unknown methods, tasks or judges, bad method params, overlapping pools."""
    cfg.align.resolved_params(ALIGN_METHODS)
    cfg.finetune.resolved_params(FINETUNE_METHODS)
    cfg.repair.resolved_params(REPAIR_METHODS)
    TASKS.get(cfg.finetune.task)
    for name in cfg.evaluate.judges:
        JUDGES.get(name)
    check_disjoint({
        "align.data.safety": load_pool(cfg.align.data.safety),
        "align.data.harmful": load_pool(cfg.align.data.harmful),
        "finetune.harmful": load_pool(cfg.finetune.harmful),
        "repair.calibration": load_pool(cfg.repair.calibration),
        "evaluate.harmful": load_pool(cfg.evaluate.harmful),
    })


# ------------------------------------------------------------------------------------- stages


def align(cfg: RunConfig) -> Path:
    """LoRA #1 on harmful prompts + safe answers (plus benign instructions), by the chosen method."""
    out = stage_dirs(cfg)["align"]
    if out.exists():
        return out
    cfg = resolve(cfg)
    validate(cfg)
    method = ALIGN_METHODS.get(cfg.align.method)
    params = cfg.align.resolved_params(ALIGN_METHODS)
    with atomic_dir(out) as work:
        report: dict[str, Any] = {"trained": method.trains}
        if method.trains:
            examples = load_pool(cfg.align.data.safety)
            if cfg.align.data.benign:
                examples = examples + load_pool(cfg.align.data.benign)
            model, tokenizer = _base(cfg)
            model = attach_lora(model, cfg.align.lora)
            extra = {"harmful": _tokenize(load_pool(cfg.align.data.harmful), tokenizer, cfg, cfg.align.train.max_length)}
            report |= _train(method, model, _tokenize(examples, tokenizer, cfg, cfg.align.train.max_length),
                             cfg, "align", params, work, tokenizer, extra)
        _finish_stage(work, cfg, "align", params, report)
    return out


def finetune(cfg: RunConfig) -> Path:
    """The user's fine-tune: LoRA #2 on n task samples of which round(p * n) are harmful."""
    align_dir = align(cfg)
    out = stage_dirs(cfg)["finetune"]
    if out.exists():
        return out
    cfg = resolve(cfg)
    validate(cfg)
    ft = cfg.finetune
    method = FINETUNE_METHODS.get(ft.method)
    params = ft.resolved_params(FINETUNE_METHODS)
    task = TASKS.get(ft.task)
    mix = build_mix(task.examples("train"), load_pool(ft.harmful), ft.n, ft.p, cfg.seed, ft.with_replacement)
    with atomic_dir(out) as work:
        write_jsonl_atomic(work / "mix.jsonl", [{"harmful": h, "prompt": e.prompt, "input": e.input,
                                                 "response": e.response} for e, h in mix])
        model, tokenizer = _base(cfg)
        adapter = align_dir / ADAPTER_DIR
        if ft.topology == "single-lora" and adapter.exists():
            model = load_adapter(model, adapter, trainable=True)
        else:
            model = attach_lora(merge_adapter(model, adapter) if adapter.exists() else model, ft.lora)
        train_set = _tokenize([e for e, _ in mix], tokenizer, cfg, ft.train.max_length)
        report = {"n": ft.n, "n_harmful": sum(h for _, h in mix), "p": ft.p, "task": ft.task}
        report |= _train(method, model, train_set, cfg, "finetune", params, work, tokenizer, {})
        _finish_stage(work, cfg, "finetune", params, report)
    return out


def repair(cfg: RunConfig) -> Path:
    """Edit the fine-tune adapter without training; returns the folder of the adapter to evaluate."""
    finetune_dir = finetune(cfg)
    method = REPAIR_METHODS.get(cfg.repair.method)
    if not method.edits:
        return finetune_dir
    out = stage_dirs(cfg)["repair"]
    if out.exists():
        return out
    cfg = resolve(cfg)
    validate(cfg)
    params = cfg.repair.resolved_params(REPAIR_METHODS)
    with atomic_dir(out) as work:
        base, tokenizer = _aligned_base(cfg)
        model = load_adapter(base, finetune_dir / ADAPTER_DIR)
        calibration = _tokenize(load_pool(cfg.repair.calibration), tokenizer, cfg, cfg.finetune.train.max_length)
        t0 = time.perf_counter()
        report = method().repair(model, calibration, params, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        model.save_pretrained(work / ADAPTER_DIR)
        _finish_stage(work, cfg, "repair", params, report)
    return out


def evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Harmful Score and Finetune Accuracy of the final model; returns the metrics."""
    from alignshield.evaluate.metrics import evaluate_model

    final_dir = repair(cfg)
    dirs = stage_dirs(cfg)
    out = dirs["evaluate"]
    if not out.exists():
        cfg = resolve(cfg)
        validate(cfg)
        with atomic_dir(out) as work:
            base, tokenizer = _aligned_base(cfg)
            model = merge_adapter(base, final_dir / ADAPTER_DIR)
            t0 = time.perf_counter()
            metrics, samples = evaluate_model(model, tokenizer, cfg)
            metrics["seconds"] = round(time.perf_counter() - t0, 2)
            write_jsonl_atomic(work / "samples.jsonl", samples)
            write_json_atomic(work / "stages.json", {k: str(v) for k, v in dirs.items()
                                                     if k != "repair" or REPAIR_METHODS.get(cfg.repair.method).edits})
            _finish_stage(work, cfg, "evaluate", None, {})
            write_json_atomic(work / "metrics.json", metrics)
    import json

    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def run(cfg: RunConfig) -> dict[str, Any]:
    """align -> finetune -> repair -> evaluate, reusing whatever is already done."""
    return evaluate(cfg)


# ------------------------------------------------------------------------------------- helpers


def _base(cfg: RunConfig):
    from transformers import set_seed

    from alignshield.models.load import load_model, load_tokenizer

    set_seed(cfg.seed)
    return load_model(cfg.model), load_tokenizer(cfg.model)


def _aligned_base(cfg: RunConfig):
    """The model a fine-tune adapter sits on: base with LoRA #1 merged (two-lora), or plain base
    (single-lora, where the one adapter carries the alignment too)."""
    model, tokenizer = _base(cfg)
    adapter = stage_dirs(cfg)["align"] / ADAPTER_DIR
    if cfg.finetune.topology == "two-lora" and adapter.exists():
        model = merge_adapter(model, adapter)
    return model, tokenizer


def _tokenize(examples: list[Example], tokenizer, cfg: RunConfig, max_length: int) -> list[Tokenized]:
    return [tokenize_pair(tokenizer, e, cfg.template, max_length) for e in examples]


def _train(method, model, train_set, cfg: RunConfig, stage: str, params, work: Path, tokenizer,
           extra: dict[str, list[Tokenized]]) -> dict[str, Any]:
    settings = getattr(cfg, stage).train
    trainer = method(model, train_set, settings, params, seed=cfg.seed, workdir=work,
                     pad_token_id=tokenizer.pad_token_id, extra_data=extra, model_config=cfg.model)
    report = trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.unwrapped_model().save_pretrained(work / ADAPTER_DIR)
    trainer.finish()
    return report | {"train_examples": len(train_set)}


def _finish_stage(work: Path, cfg: RunConfig, stage: str, params, report: dict[str, Any]) -> None:
    write_text_atomic(work / "config.yaml", dump_yaml(cfg))
    info = {"stage": stage, "report": report}
    if params is not None:
        info["method"] = getattr(cfg, stage).method
        info["params"] = params.model_dump(mode="json")
    write_json_atomic(work / "stage.json", info)
