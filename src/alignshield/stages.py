"""The four stages as plain functions over a ``RunConfig``.

Each stage first runs whatever upstream stage is missing, then stores its own output in a folder
named by a hash of everything that determines it (``<output_dir>/<stage>/<method>-<key>``). A folder
that exists is complete (it is renamed into place only at the end, see ``io.atomic_dir``), so a rerun
or a sweep never recomputes finished work, and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from alignshield import dist, tracking
from alignshield.align import ALIGN_METHODS
from alignshield.config import ConfigError, RunConfig, dump_yaml, stable_hash
from alignshield.data.collate import Tokenized, tokenize_pair
from alignshield.data.mix import build_mix, harmful_count
from alignshield.data.pools import Example, check_disjoint, load_pool
from alignshield.evaluate.judges import JUDGES
from alignshield.finetune import FINETUNE_METHODS
from alignshield.io import atomic_dir, held_lock, write_json_atomic, write_jsonl_atomic, write_text_atomic
from alignshield.models.load import resolve_adapter_compute, resolve_attention, resolve_dtype
from alignshield.models.lora import ADAPTER_DIR, MODEL_DIR, attach_lora, is_peft, load_adapter, merge_adapter
from alignshield.repair import REPAIR_METHODS
from alignshield.seeding import derive_seed
from alignshield.tasks import TASKS

log = logging.getLogger(__name__)
STAGES = ("align", "finetune", "repair", "evaluate")
GENERATED_FILE = "generated.partial.json"  # where earlier versions kept the answers of an unfinished evaluation
ANSWERS_FILE = "generated.json"  # the answers, before any judge: under generate/, reused by any later judging
JUDGING_FIELDS = ("judges", "judge_options", "coherence_gate")  # evaluate fields that do not change the answers


METHOD_REGISTRIES = {"align": ALIGN_METHODS, "finetune": FINETUNE_METHODS, "repair": REPAIR_METHODS}
"""The method registry of each stage that has one."""


def resolve(cfg: RunConfig) -> RunConfig:
    """The config with every method's parameters spelled out, defaults included: what is hashed,
    saved next to each output and printed, so equal settings always map to the same folder."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.dtype = resolve_dtype(cfg.model)
    cfg.model.attn_implementation = resolve_attention(cfg.model)
    cfg.model.adapter_compute = resolve_adapter_compute(cfg.model)
    cfg.finetune.topology = finetune_topology(cfg)
    cfg.finetune.master_weights = resolve_master_weights(cfg)
    for stage, registry in METHOD_REGISTRIES.items():
        section = getattr(cfg, stage)
        section.params = section.resolved_params(registry).model_dump(mode="json")
    return cfg


def finetune_topology(cfg: RunConfig) -> str:
    """``finetune.topology``, or where unset the fine-tune method's own (two-lora for most)."""
    if cfg.finetune.topology is not None:
        return cfg.finetune.topology
    method = FINETUNE_METHODS.get(cfg.finetune.method) if cfg.finetune.method in FINETUNE_METHODS else None
    return getattr(method, "topology", "two-lora")


def resolve_master_weights(cfg: RunConfig) -> str:
    """``finetune.master_weights`` as trained: ``float32`` only for a full-parameter fine-tune of a
    half-precision model (elsewhere the trained weights are float32 already: ``model``)."""
    if cfg.finetune.topology != "full" or cfg.model.dtype == "float32":
        return "model"
    return "float32" if cfg.finetune.master_weights == "auto" else cfg.finetune.master_weights


def stage_dirs(cfg: RunConfig) -> dict[str, Path]:
    cfg = resolve(cfg)
    root = Path(cfg.output_dir)
    a, f, r = _model_keys(cfg)
    e = stable_hash(r, _key(cfg.evaluate), _judge_versions(cfg))
    return {
        "align": root / "align" / f"{cfg.align.method}-{a}",
        "finetune": root / "finetune" / f"{cfg.finetune.method}-{f}",
        "repair": root / "repair" / f"{cfg.repair.method}-{r}",
        "evaluate": root / "evaluate" / f"{cfg.finetune.task}-{e}",
    }


def answers_dir(cfg: RunConfig) -> Path:
    """Where the evaluation keeps its answers before any judge runs: keyed by the evaluated model and
    every evaluate setting but ``JUDGING_FIELDS``, so an evaluation with other (or retrained) judges
    judges these answers instead of generating them again."""
    cfg = resolve(cfg)
    g = stable_hash(_model_keys(cfg)[2], {k: v for k, v in _key(cfg.evaluate).items() if k not in JUDGING_FIELDS})
    return Path(cfg.output_dir) / "generate" / f"{cfg.finetune.task}-{g}"


def _model_keys(cfg: RunConfig) -> tuple[str, str, str]:
    """The align, fine-tune and repair keys of a resolved config: what the evaluated model depends on."""
    common = {"seed": cfg.seed, "template": cfg.template, "model": _key(cfg.model)}
    a = stable_hash(common, _key(cfg.align))
    # a fine-tune that trains nothing is keyed by its method and task alone (the task because the
    # evaluation's accuracy is measured on it and its key builds on this one): n, p, lr... are unused
    trains = cfg.finetune.method not in FINETUNE_METHODS or FINETUNE_METHODS.get(cfg.finetune.method).trains
    ft_key = (_key(cfg.finetune) if trains else {"method": cfg.finetune.method, "task": cfg.finetune.task})
    f = stable_hash(a, ft_key)
    # a repair that edits nothing ("none") leaves the evaluation keyed by the fine-tune alone, so its
    # unused settings (e.g. the calibration pool) cannot make an identical evaluation look new
    edits = cfg.repair.method not in REPAIR_METHODS or REPAIR_METHODS.get(cfg.repair.method).edits
    r = stable_hash(f, cfg.repair.model_dump(mode="json")) if edits else f
    return a, f, r


ADDED_LATER = {"adapter_compute": lambda section: section.adapter_compute == "float32",
               "master_weights": lambda section: section.master_weights == "model",
               "select": lambda section: section.select.method == "random",
               "backend": lambda section: section.backend == "hf",
               "lm_eval": lambda section: section.lm_eval == type(section.lm_eval)()}
"""Fields added after stages were computed, and when they leave the key: ``model.adapter_compute``
at ``float32`` (what every run computed before it existed), ``finetune.select`` when
the selection is random (its other settings are then unused), ``evaluate.backend`` at ``hf``,
``evaluate.lm_eval`` at its defaults, ``finetune.master_weights`` at ``model`` (all a LoRA fine-tune or
a float32 model can be). So the
folders computed before the fields existed stay valid, and equal runs keep one folder."""


TRAIN_ADDED_LATER = {"compile": "none"}
"""Fields of a stage's ``train`` settings added after stages were computed, and the value at which
they leave the key (``train.compile=none``: every run trained eagerly before it existed)."""


def _key(section) -> dict[str, Any]:
    """A stage section's part of its key: its config, less the ``ADDED_LATER`` fields (and the
    ``TRAIN_ADDED_LATER`` fields of its ``train``) at their default."""
    dumped = section.model_dump(mode="json")
    for name, at_default in ADDED_LATER.items():
        if name in dumped and at_default(section):
            del dumped[name]
    train = dumped.get("train")
    for name, default in TRAIN_ADDED_LATER.items():
        if isinstance(train, dict) and name in train and train[name] == default:
            del train[name]
    return dumped


def _judge_versions(cfg: RunConfig) -> dict[str, Any]:
    """The judges' versions (weights digests) and the coherence gate's: a changed judge re-evaluates."""
    from alignshield.evaluate.coherence import GATE
    from alignshield.evaluate.judges import judge_version

    versions: dict[str, Any] = {"coherence_gate": repr(GATE)}  # the keyword judge uses it too
    for name in cfg.evaluate.judges:
        version = judge_version(name, cfg.evaluate.judge_options.get(name)) if name in JUDGES else None
        if version is not None:  # (an unknown judge: validate() names it)
            versions[name] = version
    return versions


def validate(cfg: RunConfig, upto: str = "evaluate") -> None:
    """Fail before any compute, for the stages up to ``upto``: unknown methods, tasks or judges, bad
    method params, a model that is not there, pools too small for the fine-tune mix or the evaluation,
    judges that cannot load, overlapping harmful pools. Nothing heavy is loaded."""
    from alignshield.evaluate.capability import check_tasks, tasks_of
    from alignshield.evaluate.judges import check_available
    from alignshield.models.load import ModelSourceError, check_model_source

    try:
        check_model_source(cfg.model.name, gguf_file=cfg.model.gguf_file, revision=cfg.model.revision)
    except ModelSourceError as err:
        raise ConfigError(str(err)) from None
    cfg.align.resolved_params(ALIGN_METHODS)
    for pool in (cfg.align.data.safety, cfg.align.data.benign, cfg.align.data.harmful):
        if pool is not None:
            load_pool(pool)
    if upto != "align":
        cfg.finetune.resolved_params(FINETUNE_METHODS)
        _check_alignment_lora(cfg, "finetune", FINETUNE_METHODS.get(cfg.finetune.method))
        _check_attention_weights(cfg, FINETUNE_METHODS.get(cfg.finetune.method))
        task = TASKS.get(cfg.finetune.task)
        if FINETUNE_METHODS.get(cfg.finetune.method).trains:
            _check_mix_sizes(cfg, task)
    if upto in ("repair", "evaluate"):
        cfg.repair.resolved_params(REPAIR_METHODS)
        _check_alignment_lora(cfg, "repair", REPAIR_METHODS.get(cfg.repair.method))
        if REPAIR_METHODS.get(cfg.repair.method).edits and not FINETUNE_METHODS.get(cfg.finetune.method).trains:
            raise ConfigError(f"repair.method={cfg.repair.method} edits the fine-tune adapter, but finetune.method="
                              f"{cfg.finetune.method} trains none: use repair.method=none")
        if getattr(REPAIR_METHODS.get(cfg.repair.method), "reads_aligned_base", False) \
                and finetune_topology(cfg) == "single-lora":
            raise ConfigError(f"repair.method={cfg.repair.method} compares the fine-tuned weights with the aligned "
                              "ones under the fine-tune adapter, but finetune.topology=single-lora puts the alignment in "
                              "that adapter: use finetune.topology=two-lora")
        if REPAIR_METHODS.get(cfg.repair.method).edits and cfg.finetune.topology == "full":
            raise ConfigError(f"repair.method={cfg.repair.method} edits the fine-tune LoRA adapter, but "
                              "finetune.topology=full trains every weight and leaves no adapter: use "
                              "repair.method=none or a LoRA topology")
    if upto == "evaluate":
        if cfg.evaluate.backend == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ConfigError("evaluate.backend=vllm needs vLLM (a CUDA machine): pip install vllm; or use "
                                  "evaluate.backend=hf")
            if dist.is_distributed():
                raise ConfigError("evaluate.backend=vllm runs in one process (vLLM spreads a model over GPUs "
                                  "itself); launch without torchrun / accelerate launch, or use evaluate.backend=hf")
        for name in cfg.evaluate.judges:
            check_available(name, cfg.evaluate.judge_options.get(name))
        check_tasks(tasks_of(cfg.evaluate.metrics), cfg.evaluate.lm_eval.include_path)  # lm-eval:TASK metrics
        test_rows = len(task.rows("test"))
        if cfg.evaluate.task_n > test_rows:
            raise ConfigError(f"evaluate.task_n={cfg.evaluate.task_n}, but the {task.name} test split "
                              f"({task.test_file}) holds {test_rows} examples")
    check_disjoint({
        "align.data.safety": load_pool(cfg.align.data.safety),
        "align.data.harmful": load_pool(cfg.align.data.harmful),
        "finetune.harmful": load_pool(cfg.finetune.harmful),
        "repair.calibration": load_pool(cfg.repair.calibration),
        "evaluate.harmful": load_pool(cfg.evaluate.harmful),
    })


def _check_alignment_lora(cfg: RunConfig, stage: str, method) -> None:
    """A method that reads the alignment LoRA (#1) beside the fine-tune LoRA (#2) (``uses_alignment``:
    asft, safelora) needs both: an alignment that trains one, and finetune.topology=two-lora."""
    if not getattr(method, "uses_alignment", False):
        return
    who = f"{stage}.method={getattr(cfg, stage).method}"
    topology = finetune_topology(cfg)
    if topology != "two-lora":
        raise ConfigError(f"{who} reads the alignment LoRA (#1) beside the fine-tune LoRA (#2): it needs "
                          f"finetune.topology=two-lora, not {topology}")
    if not ALIGN_METHODS.get(cfg.align.method).trains:
        raise ConfigError(f"{who} reads the alignment LoRA (#1), but align.method={cfg.align.method} trains none")


def _check_attention_weights(cfg: RunConfig, method) -> None:
    """A method that reads attention weights (``needs_attention_weights``: surgery) needs eager attention,
    the one implementation that returns them."""
    from alignshield.models.load import resolve_attention

    if not getattr(method, "needs_attention_weights", False):
        return
    attention = resolve_attention(cfg.model)
    if attention != "eager":
        raise ConfigError(f"finetune.method={cfg.finetune.method} reads attention weights, which only eager "
                          f"attention returns: set model.attn_implementation=eager (this config resolves to "
                          f"{attention or 'the transformers default, sdpa'})")


def _check_mix_sizes(cfg: RunConfig, task) -> None:
    """The fine-tune mix's n - round(p n) task examples and round(p n) harmful ones exist (unless
    sampling with replacement)."""
    ft = cfg.finetune
    k = harmful_count(ft.n, ft.p)
    if ft.select.method != "random":
        scored = min(ft.select.candidates, len(task.rows("train")))
        if scored < ft.n - k:
            raise ConfigError(f"finetune.select.method={ft.select.method} chooses {ft.n - k} task examples from "
                              f"{scored} candidates: raise finetune.select.candidates (the {task.name} train split "
                              f"holds {len(task.rows('train'))}) or lower finetune.n")
    if ft.with_replacement:
        return
    pool = ft.harmful
    for what, need, have, source in (
        ("task", ft.n - k, len(task.rows("train")), f"the {task.name} train split ({task.train_file})"),
        ("harmful", k, len(load_pool(pool)), f"finetune.harmful ({pool.dataset} rows [{pool.start}, {pool.stop}))"),
    ):
        if need > have:
            raise ConfigError(f"finetune.n={ft.n} with finetune.p={ft.p} needs {need} {what} examples, but "
                              f"{source} holds {have}: lower finetune.n, enlarge the pool, or set "
                              "finetune.with_replacement=true")


# ------------------------------------------------------------------------------------- stages


def align(cfg: RunConfig) -> Path:
    """LoRA #1 on harmful prompts + safe answers (plus benign instructions), by the chosen method."""
    validate(cfg, "align")
    out = stage_dirs(cfg)["align"]
    if out.exists():
        return out
    cfg = resolve(cfg)
    method = ALIGN_METHODS.get(cfg.align.method)
    params = cfg.align.resolved_params(ALIGN_METHODS)
    with _stage_output(out) as work:
        if work is None:  # another process built it while this one waited
            return out
        report: dict[str, Any] = {"trained": method.trains}
        if method.trains:
            examples = load_pool(cfg.align.data.safety)
            if cfg.align.data.benign:
                examples = examples + load_pool(cfg.align.data.benign)
            model, tokenizer = _base(cfg)
            model = attach_lora(model, cfg.align.lora)
            extra = {"harmful": _tokenize(load_pool(cfg.align.data.harmful), tokenizer, cfg, cfg.align.train.max_length)}
            report |= _train(method, model, _tokenize(examples, tokenizer, cfg, cfg.align.train.max_length),
                             cfg, "align", params, work, out, tokenizer, extra)
        _finish_stage(work, cfg, "align", params, report)
    return out


def finetune(cfg: RunConfig) -> Path:
    """The user's fine-tune: LoRA #2 on n task samples of which round(p * n) are harmful."""
    validate(cfg, "finetune")
    align_dir = align(cfg)
    out = stage_dirs(cfg)["finetune"]
    if out.exists():
        return out
    cfg = resolve(cfg)
    ft = cfg.finetune
    method = FINETUNE_METHODS.get(ft.method)
    params = ft.resolved_params(FINETUNE_METHODS)
    if not method.trains:
        with _stage_output(out) as work:
            if work is None:  # another process built it while this one waited
                return out
            _finish_stage(work, cfg, "finetune", params, {"trained": False})
        return out
    task = TASKS.get(ft.task)
    with _stage_output(out) as work:
        if work is None:  # another process built it while this one waited
            return out
        model, tokenizer = _base(cfg)
        adapter = align_dir / ADAPTER_DIR
        if ft.topology == "single-lora" and adapter.exists():
            model = load_adapter(model, adapter, trainable=True)
        elif adapter.exists():
            model = merge_adapter(model, adapter)
        # the model is now the aligned model the fine-tune starts from: a selection attack scores on it
        benign, selection = _benign_examples(model, tokenizer, cfg, task.examples("train"))
        mix = build_mix(benign, load_pool(ft.harmful), ft.n, ft.p, cfg.seed, ft.with_replacement)
        if dist.is_main_process():
            write_jsonl_atomic(work / "mix.jsonl", [{"harmful": h, "prompt": e.prompt, "input": e.input,
                                                     "response": e.response} for e, h in mix])
        if ft.topology == "full":
            model.requires_grad_(True)
            if ft.master_weights == "float32":  # mixed precision: the forwards autocast to the model's dtype
                model.float()
            elif cfg.model.dtype != "float32":
                log.warning("full-parameter fine-tuning in %s without float32 master weights "
                            "(finetune.master_weights=model): updates smaller than ~0.4 %% of a weight round away",
                            cfg.model.dtype)
        elif not is_peft(model):  # two-lora, or single-lora without an alignment adapter to train on
            model = attach_lora(model, ft.lora)
        train_set = _tokenize([e for e, _ in mix], tokenizer, cfg, ft.train.max_length)
        report = {"n": ft.n, "n_harmful": sum(h for _, h in mix), "p": ft.p, "task": ft.task} | selection
        # the alignment pool, for fine-tune-stage defences that use it (EWC's Fisher, Lisa, VLGuard mixing),
        # and which user examples are harmful (VLGuard replaces benign ones)
        extra = {"alignment": _tokenize(load_pool(cfg.align.data.safety), tokenizer, cfg, ft.train.max_length),
                 "user_harmful": [h for _, h in mix], "align_adapter": adapter if adapter.exists() else None}
        if getattr(method, "uses_harmful", False):  # the provider's harmful pairs (surgery)
            extra["harmful"] = _tokenize(load_pool(cfg.align.data.harmful), tokenizer, cfg, ft.train.max_length)
        report |= _train(method, model, train_set, cfg, "finetune", params, work, out, tokenizer, extra)
        _finish_stage(work, cfg, "finetune", params, report)
    return out


def _benign_examples(model, tokenizer, cfg: RunConfig, pool: list[Example]) -> tuple[list[Example], dict]:
    """The task examples the mix draws from: the whole train split (``select.method=random``), or the
    n - round(p n) that a selection attack scores highest on the aligned model (finetune/select.py)."""
    from alignshield.finetune import select
    from alignshield.models.layers import discover

    ft = cfg.finetune
    settings = ft.select
    if settings.method == "random":
        return pool, {}
    rows = select.candidate_indices(len(pool), settings, cfg.seed)
    harmful = load_pool(ft.harmful)
    rng = random.Random(derive_seed(cfg.seed, "benign-selection-anchors"))
    anchors = rng.sample(harmful, min(settings.anchors, len(harmful))) if settings.method == "harmful-gradient" else []
    tok = lambda examples: _tokenize(examples, tokenizer, cfg, ft.train.max_length)  # noqa: E731
    layout = discover(model, cfg.model.decoder_layers, cfg.model.attention_module)
    t0 = time.perf_counter()
    values = select.scores(model, tok([pool[i] for i in rows]), tok(anchors), settings, layout.layers,
                           tokenizer.pad_token_id)
    chosen = select.top(values, ft.n - harmful_count(ft.n, ft.p))
    report = {"select": {"method": settings.method, "candidates": len(rows), "chosen": len(chosen),
                         "chosen_rows": [rows[i] for i in chosen],
                         "score_chosen_min": round(min((values[i] for i in chosen), default=math.nan), 6),
                         "score_median": round(statistics.median(values), 6),
                         "seconds": round(time.perf_counter() - t0, 2)}}
    return [pool[rows[i]] for i in chosen], report


def repair(cfg: RunConfig) -> Path:
    """Edit the fine-tune adapter (by training it, for ``oneshot-patch``); returns the folder of the adapter
    to evaluate."""
    validate(cfg, "repair")
    finetune_dir = finetune(cfg)
    method = REPAIR_METHODS.get(cfg.repair.method)
    if not method.edits:
        return finetune_dir
    out = stage_dirs(cfg)["repair"]
    if out.exists():
        return out
    cfg = resolve(cfg)
    params = cfg.repair.resolved_params(REPAIR_METHODS)
    with _stage_output(out) as work:
        if work is None:  # another process built it while this one waited
            return out
        base, tokenizer = _aligned_base(cfg)
        model = load_adapter(base, finetune_dir / ADAPTER_DIR)
        calibration = _tokenize(load_pool(cfg.repair.calibration), tokenizer, cfg, cfg.finetune.train.max_length)
        t0 = time.perf_counter()
        # methods that read the alignment LoRA (#1) itself, e.g. safelora's alignment subspace
        context = ({"align_adapter": stage_dirs(cfg)["align"] / ADAPTER_DIR, "topology": cfg.finetune.topology}
                   if getattr(method, "uses_alignment", False) else {})
        if getattr(method, "uses_safety_data", False):  # the provider's safety pairs (safedelta's H)
            context["safety"] = _tokenize(load_pool(cfg.align.data.safety), tokenizer, cfg, cfg.finetune.train.max_length)
        if getattr(method, "uses_tokenizer", False):  # a method that trains on pairs of its own (oneshot-patch)
            context["tokenize"] = lambda e: tokenize_pair(tokenizer, e, cfg.template, cfg.finetune.train.max_length)
            context["model_config"] = cfg.model
        report = method().repair(model, calibration, params, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id,
                                 **context)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        with tracking.logger(tracking.for_stage(cfg, "repair", out)) as log_to:
            log_to(report)
        if dist.is_main_process():
            model.save_pretrained(work / ADAPTER_DIR)
        _finish_stage(work, cfg, "repair", params, report)
    return out


def evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Harmful Score and Finetune Accuracy of the final model (plus ``evaluate.metrics``); returns the metrics.

    Memory: the aligned model (only for ``harmful_embedding_drift``), the evaluated model and each
    judge are loaded one after another, never together. Generated answers are saved in the scratch
    folder before the judges run, so a judge that fails to load does not cost the generation again.
    """
    validate(cfg, "evaluate")  # a judge that cannot load, or a typo in its options, costs no training first
    final_dir = repair(cfg)
    dirs = stage_dirs(cfg)
    out = dirs["evaluate"]
    if not out.exists():
        cfg = resolve(cfg)
        with _stage_output(out) as work:
            if work is not None:
                _evaluate_into(work, cfg, final_dir, dirs)
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def final_model(cfg: RunConfig, final_dir: Path | None = None):
    """The model the evaluation judges, with its tokenizer: the aligned base with the (repaired)
    fine-tune adapter merged, or the aligned model as shipped when nothing was fine-tuned. Runs the
    missing stages first when ``final_dir`` (``repair(cfg)``'s folder) is not given."""
    final_dir = repair(cfg) if final_dir is None else final_dir
    adapter = final_dir / ADAPTER_DIR
    if (final_dir / MODEL_DIR).exists():  # finetune.topology=full: the whole fine-tuned model
        from alignshield.models.load import load_model, load_tokenizer

        whole = cfg.model.model_copy(update={"name": str(final_dir / MODEL_DIR), "gguf_file": None, "revision": None})
        return load_model(whole), load_tokenizer(cfg.model)
    if adapter.exists():
        model, tokenizer = _aligned_base(cfg)
        return merge_adapter(model, adapter), tokenizer
    return _aligned_model(cfg)  # no fine-tune adapter (finetune.method=none)


def _evaluate_into(work: Path, cfg: RunConfig, final_dir: Path, dirs: dict[str, Path]) -> None:
    """Generate (or reload the answers: of an evaluation of the same model and settings with other
    judges, or saved by an interrupted attempt), judge, write the metrics."""
    from alignshield.evaluate.capability import capability_metrics, tasks_of
    from alignshield.evaluate.drift import analysis_metrics, reference_states
    from alignshield.evaluate.metrics import generate_answers, judge_samples, ordered

    t0 = time.perf_counter()
    kept = answers_dir(cfg) / ANSWERS_FILE
    legacy = work / GENERATED_FILE  # answers of an attempt interrupted before they were kept under generate/
    if kept.exists() or legacy.exists():
        saved = json.loads((kept if kept.exists() else legacy).read_text(encoding="utf-8"))
        metrics, samples, spent = saved["metrics"], saved["samples"], saved["seconds"]
    else:
        reference = None
        if "harmful_embedding_drift" in cfg.evaluate.metrics:
            aligned, tokenizer = _aligned_model(cfg)
            reference = reference_states(aligned, tokenizer, cfg)
            del aligned
            _release_memory()
        model, tokenizer = final_model(cfg, final_dir)
        metrics, samples = generate_answers(model, tokenizer, cfg, scratch=work)
        metrics |= analysis_metrics(model, tokenizer, cfg, reference)
        metrics |= capability_metrics(model, tokenizer, tasks_of(cfg.evaluate.metrics), cfg.evaluate.lm_eval,
                                      seed=cfg.seed)
        del model, reference
        _release_memory()
        spent = time.perf_counter() - t0
        t0 = time.perf_counter()
    if dist.is_main_process() and not kept.exists():  # before judging, which fills the samples' verdicts
        write_json_atomic(kept, {"metrics": metrics, "samples": samples, "seconds": spent})
    metrics |= judge_samples(samples, cfg)
    metrics = ordered(metrics)
    metrics["seconds"] = round(spent + time.perf_counter() - t0, 2)
    if dist.is_main_process():  # DDP: every rank evaluated; rank 0 writes
        write_jsonl_atomic(work / "samples.jsonl", samples)
        write_json_atomic(work / "stages.json", {k: str(v) for k, v in dirs.items()
                                                 if k != "repair" or REPAIR_METHODS.get(cfg.repair.method).edits})
        _finish_stage(work, cfg, "evaluate", None, {})
        write_json_atomic(work / "metrics.json", metrics)
        with tracking.logger(tracking.for_stage(cfg, "evaluate", dirs["evaluate"])) as log_to:
            log_to(metrics)
        legacy.unlink(missing_ok=True)


def run(cfg: RunConfig) -> dict[str, Any]:
    """align -> finetune -> repair -> evaluate, reusing whatever is already done."""
    return evaluate(cfg)


# ------------------------------------------------------------------------------------- helpers


def _base(cfg: RunConfig):
    from transformers import set_seed

    from alignshield.models.load import EMBEDDED_NAME, embedded_checkpoint, load_model, load_tokenizer

    if cfg.model.name == EMBEDDED_NAME:
        # DDP: the one-time GGUF -> safetensors conversion renames a cache folder; rank 0 does it alone
        with dist.main_process_first():
            embedded_checkpoint()
    set_seed(cfg.seed)
    return load_model(cfg.model), load_tokenizer(cfg.model)


def _aligned_base(cfg: RunConfig):
    """The model a fine-tune adapter sits on: base with LoRA #1 merged (two-lora), or plain base
    (single-lora, where the one adapter carries the alignment too)."""
    cfg = resolve(cfg)
    model, tokenizer = _base(cfg)
    adapter = stage_dirs(cfg)["align"] / ADAPTER_DIR
    if cfg.finetune.topology == "two-lora" and adapter.exists():
        model = merge_adapter(model, adapter)
    return model, tokenizer


def _aligned_model(cfg: RunConfig):
    """The ALIGNED model, base with LoRA #1 merged whatever the topology (the base when alignment
    trained nothing): the reference of ``harmful_embedding_drift``."""
    model, tokenizer = _base(cfg)
    adapter = stage_dirs(cfg)["align"] / ADAPTER_DIR
    if adapter.exists():
        model = merge_adapter(model, adapter)
    return model, tokenizer


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokenize(examples: list[Example], tokenizer, cfg: RunConfig, max_length: int) -> list[Tokenized]:
    return [tokenize_pair(tokenizer, e, cfg.template, max_length) for e in examples]


def _train(method, model, train_set, cfg: RunConfig, stage: str, params, work: Path, out: Path, tokenizer,
           extra: dict[str, list]) -> dict[str, Any]:
    """Train in the scratch folder ``work`` of the stage folder ``out`` (which names the tracker run)."""
    settings = getattr(cfg, stage).train
    trainer = method(model, train_set, settings, params, seed=cfg.seed, workdir=work,
                     pad_token_id=tokenizer.pad_token_id, extra_data=extra, model_config=cfg.model,
                     tracking=tracking.for_stage(cfg, stage, out))
    report = trainer.train()
    if trainer.accelerator.is_main_process:
        trained = trainer.unwrapped_model()
        if not is_peft(trained) and cfg.model.dtype != "float32":  # float32 master weights: saved as evaluated
            import torch

            trained.to(getattr(torch, cfg.model.dtype))
        trained.save_pretrained(work / (ADAPTER_DIR if is_peft(trained) else MODEL_DIR))
    trainer.finish()
    return report | {"train_examples": len(train_set)}


def _finish_stage(work: Path, cfg: RunConfig, stage: str, params, report: dict[str, Any]) -> None:
    if not dist.is_main_process():
        return
    write_text_atomic(work / "config.yaml", dump_yaml(cfg))
    info = {"stage": stage, "report": report}
    if params is not None:
        info["method"] = getattr(cfg, stage).method
        info["params"] = params.model_dump(mode="json")
    write_json_atomic(work / "stage.json", info)


# ------------------------------------------------------------------- multi-process (DDP) runs
# Under ``torchrun`` / ``accelerate launch`` every process runs the same stage code: training is
# data-parallel (train.Trainer), the evaluation's generation is split across ranks (evaluate/metrics.py),
# and the repair and the judges run redundantly on every rank (same weights, same data, same result).
# Only rank 0 writes a stage's files, and the ``.partial`` ->
# final rename happens once, between barriers: no rank reads a half-written folder, no two ranks
# race on a rename or a file. In a single process none of this initialises anything.


_built: list[Path] | None = None


@contextmanager
def recording_builds() -> Iterator[list[Path]]:
    """Collects the stage folders this process builds inside the block (reused ones are not listed)."""
    global _built
    outer, _built = _built, []
    try:
        yield _built
    finally:
        _built = outer


@contextmanager
def _stage_output(out: Path):
    """``io.atomic_dir`` under a lock on ``out``, for one process or many. Yields the scratch folder,
    or None when ``out`` was finished by another process while this one waited: then use it.

    The lock (a file in ``<output_dir>/.locks``) lets several sweeps share an output folder: the
    second to reach a stage waits for the first and reuses its folder instead of building into the
    same scratch folder. Under DDP rank 0 holds it for all ranks: every rank gets the same
    ``<out>.partial`` folder (training checkpoints there and resumes from it); rank 0 alone renames it
    to ``out``, after every rank is done with it, and no rank leaves before ``out`` is in place."""
    state = dist.state() if dist.is_distributed() else None
    main = state is None or state.is_main_process
    lock = out.parent.parent / ".locks" / out.parent.name / out.name  # <output_dir>/.locks/<stage>/<name>
    with held_lock(lock) if main else nullcontext():
        if state is not None:
            state.wait_for_everyone()  # every rank looks at ``out`` while rank 0 holds the lock
        if out.exists():
            yield None
            return
        if state is None:
            with atomic_dir(out) as work:
                yield work
        elif main:
            with atomic_dir(out) as work:
                state.wait_for_everyone()  # the scratch folder exists
                yield work
                state.wait_for_everyone()  # every rank is done with it
            state.wait_for_everyone()  # renamed into place
        else:
            state.wait_for_everyone()
            yield out.with_name(out.name + ".partial")  # io.atomic_dir's scratch name
            state.wait_for_everyone()
            state.wait_for_everyone()
        if _built is not None:
            _built.append(out)
