"""One worker of ``align_cost.py``: one method on one model, in its own process (``align_cost.py --worker``).

It builds the model and its alignment examples, trains ``warmup`` + ``steps`` steps with the method's
trainer, and returns per-step wall and CPU times and the RSS peaks of the timed window; for T-Vaccine
also its layer-scoring pass, timed apart. How and why: ``align_cost.py --help``.
Torch and alignshield are imported inside the functions, so the parent process never loads them.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from _align_cost_rows import BASELINE_PARAMS, ROWS

# ----------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    """Set the RSS high-water mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RSSSampler(threading.Thread):
    """VmRSS every ``every`` seconds; ``reset()`` starts a new window, ``peak`` is that window's max."""

    def __init__(self, every: float = 0.002):
        super().__init__(daemon=True)
        self.every, self.peak = every, _rss_mb()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.every):
            self.peak = max(self.peak, _rss_mb())

    def reset(self) -> float:
        old, self.peak = self.peak, _rss_mb()
        return old

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return max(self.peak, _rss_mb())


class Window:
    """Peak RSS of a stretch of code: VmHWM (reset at the start) and the sampler, in MB."""

    def __init__(self, sampler: RSSSampler):
        self.sampler = sampler

    def start(self) -> "Window":
        self.rss_start = _rss_mb()
        self.hwm_ok = _reset_hwm()
        self.sampler.reset()
        return self

    def peak(self) -> tuple[float, float]:
        """(peak by VmHWM or, if it could not be reset, by sampling; peak by sampling)."""
        sampled = max(self.sampler.peak, _rss_mb())
        return (_hwm_mb() if self.hwm_ok else sampled), sampled


# ----------------------------------------------------------------------------- models


class Built(NamedTuple):
    """A model ready to train and what its trainer needs."""

    model: Any
    train_set: list
    harmful: list
    pad_id: int
    model_cfg: Any
    settings: Any  # AlignTrain
    seed: int
    info: dict  # model_desc, dtype, lora: reported as they are
    lora: Any  # the LoraSettings of the model's LoRA (a fresh fine-tune LoRA #2 gets the same)


def build_embedded(spec: dict) -> Built:
    """SmolLM2-135M-Instruct with the ``embedded`` preset's settings and real alignment examples."""
    from alignshield.config import load_config
    from alignshield.data.collate import tokenize_pair
    from alignshield.data.pools import load_pool
    from alignshield.models.load import load_model, load_tokenizer
    from alignshield.models.lora import attach_lora

    cfg = load_config(preset="embedded", overrides=[f"align.train.batch_size={spec['batch']}",
                                                    f"align.train.max_length={spec['seq']}"])
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    model = attach_lora(model, cfg.align.lora)
    examples = load_pool(cfg.align.data.safety) + (load_pool(cfg.align.data.benign) if cfg.align.data.benign else [])

    def tok(pool):
        return [tokenize_pair(tokenizer, e, cfg.template, cfg.align.train.max_length) for e in pool]

    info = {"model_desc": "SmolLM2-135M-Instruct (embedded)", "dtype": cfg.model.dtype,
            "lora": f"r={cfg.align.lora.r} on {','.join(cfg.align.lora.target_modules)}"}
    return Built(model, tok(examples), tok(load_pool(cfg.align.data.harmful)), tokenizer.pad_token_id, cfg.model,
                 cfg.align.train, cfg.seed, info, cfg.align.lora)


def _random_set(d: dict, n: int, generator) -> list:
    """n examples of random ids: the first half "prompt" (masked), the second "answer" (labelled)."""
    import torch

    from alignshield.data.collate import IGNORE_INDEX, Tokenized

    out = []
    for _ in range(n):
        ids = torch.randint(0, d["vocab"], (d["seq"],), generator=generator).tolist()
        half = d["seq"] // 2
        out.append(Tokenized(ids, [IGNORE_INDEX] * half + ids[half:]))
    return out


def build_deep(spec: dict) -> Built:
    """A Llama built in code (``spec["deep"]``: layers, hidden, ...), random init, random token ids."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alignshield.config import AlignTrain, LoraSettings, ModelConfig
    from alignshield.models.lora import attach_lora

    d = spec["deep"]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["deep_dtype"]]
    config = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                         num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["heads"],
                         max_position_embeddings=max(256, d["seq"]), tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=dtype), LoraSettings())
    g = torch.Generator().manual_seed(1)
    train_set, harmful = _random_set(d, 64, g), _random_set(d, 64, g)
    info = {"model_desc": (f"Llama {d['layers']}L h{d['hidden']} mlp{d['intermediate']} heads{d['heads']} "
                           f"vocab{d['vocab']} (random init, random ids)"),
            "dtype": spec["deep_dtype"], "lora": f"r={LoraSettings().r} on {','.join(LoraSettings().target_modules)}"}
    train = AlignTrain(batch_size=d["batch"], max_length=d["seq"])
    return Built(model, train_set, harmful, 0, ModelConfig(name="deep"), train, 42, info, LoraSettings())


BUILDERS = {"embedded": build_embedded, "deep": build_deep}


# ----------------------------------------------------------------------------- methods


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def method_classes(spec: dict):
    """(trainer class, params) of ``spec["method"]``: a row of ROWS, else a registered method's defaults."""
    name = spec["method"]
    if name in ROWS:
        row = ROWS[name]
        return _load(row.trainer), _load(row.params)(**row.kwargs(spec))
    from alignshield.align import ALIGN_METHODS
    from alignshield.config import MethodParams
    from alignshield.finetune import FINETUNE_METHODS

    registry = ALIGN_METHODS if name in ALIGN_METHODS else FINETUNE_METHODS
    cls = registry.get(name)
    return cls, getattr(cls, "Params", MethodParams)(**BASELINE_PARAMS.get(name, {}))


def train_alignment_lora(built: Built, steps: int, out: Path) -> None:
    """LoRA #1 as the align stage makes it: the model's LoRA trained by sft (``steps`` steps on the
    alignment examples, the align settings), saved to ``out``."""
    from alignshield.config import MethodParams
    from alignshield.train import Trainer

    settings = built.settings.model_copy(update={"max_steps": steps, "checkpoint_every": 10**9})
    trainer = Trainer(built.model, built.train_set, settings, MethodParams(), seed=built.seed,
                      workdir=out.parent / "align-run", pad_token_id=built.pad_id, model_config=built.model_cfg,
                      progress=False)
    trainer.train()
    trainer.unwrapped_model().save_pretrained(out)
    trainer.finish()


def with_alignment_lora(built: Built, adapter: Path) -> Built:
    """The model the fine-tune stage trains a method that reads LoRA #1 on: the base with LoRA #1 merged
    (stages.finetune's ``merge_adapter``) and a fresh LoRA #2 on top, with the same settings as every
    other row (the embedded preset's ``finetune.lora`` equals its ``align.lora``)."""
    from alignshield.models.lora import attach_lora, merge_adapter

    model = attach_lora(merge_adapter(built.model.unload(), adapter), built.lora)
    _trim()
    return built._replace(model=model)


def _alignment_lora_subprocess(spec: dict, out: Path) -> float:
    """``train_alignment_lora`` in a process of its own (as the align stage runs before the fine-tune):
    what it allocates and the runtime buffers its steps create stay out of this worker's memory
    columns. Returns its wall seconds."""
    import json
    import subprocess
    import sys

    t0 = time.perf_counter()
    child = spec | {"role": "align-lora", "out": str(out)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("align_cost.py")), "--worker",
                           json.dumps(child)], capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "adapter_config.json").exists():
        raise RuntimeError(f"training LoRA #1 failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _penalty_cost(trainer, calls: int = 5) -> dict:
    """AsFT's extra work per step, timed apart after training: the penalty and its backward (median of
    ``calls``), and how many modules it anchors."""
    walls, cpus = [], []
    for _ in range(calls):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.regulariser().backward()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"penalty_seconds": statistics.median(walls), "penalty_cpu_seconds": statistics.median(cpus),
            "anchored": len(trainer.anchors), "unanchored": len(trainer.unanchored)}


# ----------------------------------------------------------------------------- timing


class StepClock:
    """(wall, process CPU) at the start of every step; the memory window restarts at step ``warm``."""

    def __init__(self, warm: int):
        self.warm, self.marks = warm, []
        self.sampler = RSSSampler()
        self.window = Window(self.sampler)
        self.warmup_peak = self.rss_timed_start = None

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_step_start(self, step: int) -> None:
        if step == self.warm:  # the timed window starts, after the warm-up steps' memory is released
            self.warmup_peak = self.window.peak()
            _trim()
            self.rss_timed_start = _rss_mb()
            self.window.start()
        self.mark()

    def durations(self) -> tuple[list[float], list[float]]:
        """Per-step wall and CPU seconds, warm-up steps included."""
        pairs = list(zip(self.marks, self.marks[1:]))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def _clocked(cls, clock: StepClock):
    class Timed(cls):
        def on_step_start(self):
            clock.on_step_start(self.step)
            super().on_step_start()

    return Timed


def _time_layer_scores(trainer) -> list[tuple[float, float]]:
    """Wrap T-Vaccine's ``layer_scores``: the returned list gets (wall, CPU) of each call in training."""
    calls: list[tuple[float, float]] = []
    original = trainer.layer_scores

    def timed_scores():
        t0, c0 = time.perf_counter(), time.process_time()
        out = original()
        calls.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    trainer.layer_scores = timed_scores
    return calls


def _train(trainer, clock: StepClock) -> dict:
    """Train; the RSS before train(), the window's peaks, and when training started and ended."""
    _trim()
    baseline = _rss_mb()
    t_train = time.perf_counter()
    clock.sampler.start()
    clock.window.start()
    trainer.train()
    clock.mark()
    peak, peak_sampled = clock.window.peak()
    return {"baseline": baseline, "peak": peak, "peak_sampled": peak_sampled, "t_train": t_train,
            "t_after": time.perf_counter()}


def _scoring(trainer, window: Window, baseline: float, calls: list, remeasure: bool) -> dict:
    """T-Vaccine's layer scoring: timed once more, warm, with its own memory window (or, with
    ``remeasure`` False, the step-0 call, cold; its memory is then in the warm-up peak)."""
    active = list(trainer.active)
    checkpointed = [i for i, layer in enumerate(trainer.layout.layers) if "forward" in layer.__dict__]
    score_peak_mb = score_step_mb = None
    if remeasure:
        _trim()
        score_start = _rss_mb()
        window.start()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.layer_scores()
        score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
        score_peak, _ = window.peak()
        score_peak_mb, score_step_mb = score_peak - baseline, score_peak - score_start
    else:
        score_s, score_cpu = calls[0]
    p = trainer.params
    return {
        "score_seconds": score_s, "score_cpu_seconds": score_cpu,
        "score_seconds_step0": calls[0][0] if calls else None, "score_remeasured": remeasure,
        "score_every": p.score_every, "resample_every": p.resample_every,
        "layers_per_step": trainer.n_active, "score_batch_size": p.score_batch_size,
        "score_peak_mb": score_peak_mb, "score_step_mb": score_step_mb,
        "active_layers": active, "checkpointed_layers": checkpointed,
    }


def _per_step(durations: list[float], first_step: int, method: str, spec: dict, extra: dict) -> dict:
    """s/step from per-step durations: the median; vaccine-fast amortized over k; t-vaccine + scoring / K."""
    out = {"median": statistics.median(durations), "mean": statistics.fmean(durations)}
    out["per_step"] = out["median"]
    if method == "vaccine-fast":
        k = spec["fast_k"]
        steps = range(first_step, first_step + len(durations))
        refresh = [d for i, d in zip(steps, durations) if i % k == 0]
        reuse = [d for i, d in zip(steps, durations) if i % k != 0] or refresh
        out["median_refresh"], out["median_reuse"] = statistics.median(refresh), statistics.median(reuse)
        out["per_step"] = (out["median_refresh"] + (k - 1) * out["median_reuse"]) / k
    if method == "t-vaccine":
        out["excl_scoring"] = out["median"]
        out["per_step"] = out["median"] + extra["score"] / extra["score_every"]
    return out


# ----------------------------------------------------------------------------- the worker


def _import_runtime(threads: int):
    """torch with ``threads`` threads, transformers quiet, every method registered; returns torch."""
    import torch

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    for module in ("alignshield.align", "alignshield.finetune"):  # registers the methods
        importlib.import_module(module)
    hf_logging.set_verbosity_error()
    return torch


def _timed_steps(spec: dict) -> int:
    if spec["method"] == "vaccine-fast":
        return max(spec["steps"], spec["fast_k"])  # a whole refresh period: at least one refresh step is timed
    return spec["steps"]


def worker(spec: dict) -> dict:
    """Build, train ``warmup`` + timed steps, measure; the result is one JSON-able dict. (With
    ``spec["role"] == "align-lora"``: only train LoRA #1 and save it to ``spec["out"]``.)"""
    t_import = time.perf_counter()
    torch = _import_runtime(spec["threads"])
    if spec.get("role") == "align-lora":
        train_alignment_lora(BUILDERS[spec["model"]](spec), spec["align_steps"], Path(spec["out"]))
        return {"ok": True, "out": spec["out"]}
    t_build = time.perf_counter()
    built = BUILDERS[spec["model"]](spec)
    cls, params = method_classes(spec)
    warm, timed = spec["warmup"], _timed_steps(spec)
    settings = built.settings.model_copy(update={"max_steps": warm + timed, "checkpoint_every": 10**9})
    clock = StepClock(warm)
    extra_data, alignment = {"harmful": built.harmful, "alignment": built.train_set}, {}
    with tempfile.TemporaryDirectory() as work:
        if getattr(cls, "uses_alignment", False):  # asft: LoRA #1 trained, saved, merged; LoRA #2 fresh
            adapter = Path(work) / "align-adapter"
            alignment = {"align_steps": spec["align_steps"], "align_lora_s": _alignment_lora_subprocess(spec, adapter)}
            built, extra_data["align_adapter"] = with_alignment_lora(built, adapter), adapter
        trainer = _clocked(cls, clock)(
            built.model, built.train_set, settings, params, seed=built.seed, workdir=Path(work),
            pad_token_id=built.pad_id, extra_data=extra_data, model_config=built.model_cfg, progress=False)
        score_calls = _time_layer_scores(trainer) if spec["method"] == "t-vaccine" else []
        run = _train(trainer, clock)
        scoring = (_scoring(trainer, clock.window, run["baseline"], score_calls, spec.get("remeasure_scoring", True))
                   if spec["method"] == "t-vaccine" else {})
        penalty = _penalty_cost(trainer) if spec["method"] == "asft" else {}
        clock.sampler.stop()
        n_layers = len(trainer.layout) if hasattr(trainer, "layout") else len(trainer.discover_layers().layers)
        trainable = sum(p.numel() for p in trainer.trainable)
        widths = [len(t.input_ids) for t in built.train_set]
    phases = {"imports": t_build - t_import, "build": run["t_train"] - t_build,
              "train": run["t_after"] - run["t_train"]}
    setup = {"threads": torch.get_num_threads(), "batch": settings.batch_size, "max_length": settings.max_length,
             "timed_steps": timed, "warmup_steps": warm, "mean_example_tokens": round(statistics.fmean(widths), 1),
             "n_layers": n_layers, "trainable_params": trainable}
    return scoring | penalty | alignment | _measurements(spec, clock, run, scoring) | setup | {
        "phases_s": phases | {"after": time.perf_counter() - run["t_after"]}, **built.info}


def _measurements(spec: dict, clock: StepClock, run: dict, scoring: dict) -> dict:
    """Times per step (wall and CPU) and memory peaks, from the clock's marks and the training run."""
    warm, method = clock.warm, spec["method"]
    walls, cpus = clock.durations()
    wall = _per_step(walls[warm:], warm, method, spec,
                     {"score": scoring.get("score_seconds"), "score_every": scoring.get("score_every")})
    cpu = _per_step(cpus[warm:], warm, method, spec,
                    {"score": scoring.get("score_cpu_seconds"), "score_every": scoring.get("score_every")})
    baseline, peak, timed_start = run["baseline"], run["peak"], clock.rss_timed_start
    return {
        "method": method, "model": spec["model"], "ok": True,
        "seconds_per_step": wall["per_step"], "cpu_seconds_per_step": cpu["per_step"],
        "wall": wall, "cpu": cpu,
        "step_seconds": walls[warm:], "warmup_step_seconds": walls[:warm], "cpu_step_seconds": cpus[warm:],
        "baseline_rss_mb": baseline, "timed_start_mb": timed_start - baseline,
        "peak_mb": peak - baseline, "peak_mb_sampled": run["peak_sampled"] - baseline,
        "step_mb": peak - timed_start, "warmup_peak_mb": clock.warmup_peak[0] - baseline,
        "memory_method": ("VmHWM reset via /proc/self/clear_refs" if clock.window.hwm_ok
                          else "VmRSS sampled every 2 ms"),
    }
