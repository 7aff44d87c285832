#!/usr/bin/env python
"""Per-step time and peak memory of the alignment methods, each in its own subprocess.

    python benchmarks/align_cost.py              # embedded model + 24-layer Llama, 1 warm-up + 6 timed steps
    python benchmarks/align_cost.py --threads 1  # the same on one core: the steadiest ratios on a shared CPU
    python benchmarks/align_cost.py --quick      # 24-layer Llama only, smaller shapes, 1 + 2 steps (< 60 s)
    python benchmarks/align_cost.py --models deep --methods sft,vaccine,t-vaccine --steps 2 --malloc-mmap

Methods (``--methods``):

* ``sft``               alignshield.train.Trainer (one forward + backward per step)
* ``vaccine``           VaccineTrainer, refresh_every=1 (the exact method: pass 1 + pass 2 every step)
* ``vaccine-fast``      VaccineTrainer, refresh_every=k (``--fast-k``, default 5; the opt-in cheaper mode)
* ``random-vaccine``    RandomVaccineTrainer (no pass 1)
* ``t-vaccine``         TVaccineTrainer, S=8 (``--tv-layers``), default K=200 / J=20
* ``reference-vaccine`` a port, in this file, of git-disl/Vaccine's two-full-pass step (timing only)
* any other registered align or finetune method by name (``repnoise``, ``booster``, ``tar``, ``ewc``, ``kl``,
  ``vlguard``, ``lisa``, ``ldifs``; ``--methods baselines`` runs sft and all of them), with its default
  params; fine-tune-stage methods get the same alignment examples as their ``alignment`` data

Models (``--models``):

* ``embedded``  SmolLM2-135M-Instruct through alignshield's loader with the ``embedded`` preset's settings
  (bf16 weights, LoRA r=8 on every linear projection, batch 8, max_length 128, real alignment examples:
  ``align.data.safety`` + ``align.data.benign``; T-Vaccine scores on ``align.data.harmful``).
* ``deep``      a Llama built in code, 24 layers, hidden 256, 4 heads, MLP 1024, vocab 2048, bf16, LoRA as
  above, batch 8 x 256 random token ids: activations dominate memory, which shows T-Vaccine's saving.

Timing: every step is timed from one ``on_step_start`` to the next (forward(s), backward(s), clipping,
optimizer step), in wall time and in process CPU time; ``--warmup`` steps are dropped and s/step is the
median of the ``--steps`` timed steps. vaccine-fast times at least k consecutive steps and reports the
amortized cost (median refresh step + (k-1) x median reuse step) / k. T-Vaccine's layer scoring runs at
step 0 (a warm-up step) and then every K=200 steps: it is timed apart (once more, warm, after the timed
steps; with --quick the step-0 call is used) and added as score_seconds / K to give the amortized s/step
used in the ratios; the table shows both parts.

Memory: peak = the kernel's RSS high-water mark over the timed steps (VmHWM, reset through
/proc/self/clear_refs when the timed window starts) minus the RSS right before ``train()``; "step MB" is
the same peak minus the RSS at the start of the timed window. Before each reading the worker calls
``malloc_trim(0)``, so memory freed by model loading and by the warm-up steps is handed back and neither
hides nor inflates the peak. A thread sampling VmRSS every 2 ms gives a cross-check (and the number, if
the reset is refused). RSS includes what glibc keeps of freed memory; ``--malloc-mmap`` runs the workers
with ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation >= 64 KiB is its own mapping, unmapped on free), so
RSS follows the live tensors; it slows steps 2-3x, so use it for the memory columns, not for times.

Threads: ``--threads`` (default: all cores) sets torch's threads in each worker; workers run one after the
other. ``OMP_WAIT_POLICY=PASSIVE`` is set unless already set: on a CPU shared with other jobs, spinning
OpenMP threads made 2-thread steps 5-30x slower and erratic.

The last line printed is one JSON object (ratios in wall and CPU time, raw numbers, settings). The CPU may
be shared with other jobs: wall times then vary with the load; compare the "cores" column between rows.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sft", "vaccine", "vaccine-fast", "random-vaccine", "t-vaccine", "reference-vaccine"]
BASELINES = ["repnoise", "booster", "tar", "ewc", "kl", "vlguard", "lisa", "ldifs"]
MODELS = ["embedded", "deep"]
DEEP = {"layers": 24, "hidden": 256, "heads": 4, "intermediate": 1024, "vocab": 2048, "seq": 256, "batch": 8}
DEEP_QUICK = {"layers": 24, "hidden": 128, "heads": 4, "intermediate": 256, "vocab": 1024, "seq": 96, "batch": 4}
GOALS = {
    "vaccine_over_sft_time": 2.0,
    "vaccine_over_reference_time": 1.0,
    "tvaccine_over_vaccine_peak_mem": 0.6,
    "fast_vaccine_over_sft_time": 1.3,
}


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


# ----------------------------------------------------------------------------- the reference port


def reference_vaccine_class():
    """PORT FOR TIMING ONLY -- not an alignshield method, never registered, never used to train models.

    git-disl/Vaccine @ 8937f68, trainer.py:53-181 (``VaccineTrainer.training_step``), on alignshield's loop:
    pass 1 is a normal forward + ``loss.backward()`` (parameter gradients included) with backward hooks on
    every attention block capturing dL/d(attention output); ``model.zero_grad()`` throws the parameter
    gradients away; e_l = rho * g_l / (||g|| + 1e-7) with one global norm; pass 2 adds e_l to the attention
    outputs through ``.data`` (a constant to autograd) and its backward drives the optimizer step.
    ``register_full_backward_hook`` replaces the deprecated ``register_backward_hook``; the compute is the same.
    """
    import warnings

    import torch

    from alignshield.align.vaccine import VaccineParams
    from alignshield.models.layers import discover
    from alignshield.train import Trainer

    # expected: the attention block gets its tensors as keyword arguments, so the hook sees no grad_input
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

    class ReferenceVaccinePort(Trainer):
        Params = VaccineParams

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.attentions = discover(self.unwrapped_model()).attentions  # V: isinstance(LlamaAttention)

        def training_step(self, batch):
            model, ga, grads = self.model, self.args.grad_accum, {}

            def capture(i):  # V :93-96
                def hook(module, grad_input, grad_output):
                    grads[i] = grad_output[0].detach().clone() / ga
                return hook

            handles = [m.register_full_backward_hook(capture(i)) for i, m in enumerate(self.attentions)]
            self.accelerator.backward(self.compute_loss(model, batch))  # pass 1: full forward + backward (V :83)
            for h in handles:
                h.remove()
            norm = torch.norm(torch.stack([torch.norm(g, 2) for g in grads.values()]), 2)  # V _grad_norm :168-181
            e = {i: self.params.rho * g / (norm + 1e-7) for i, g in grads.items()}  # V :149-151
            model.zero_grad()  # V :85: the pass-1 parameter gradients are discarded

            def perturb(i):  # V :112-121
                def hook(module, args, output):
                    output[0].data = output[0] + e[i]
                return hook

            handles = [m.register_forward_hook(perturb(i)) for i, m in enumerate(self.attentions)]
            loss = self.compute_loss(model, batch)  # pass 2 (V :87)
            self.accelerator.backward(loss / ga)
            for h in handles:
                h.remove()
            return loss.detach()

    return ReferenceVaccinePort


# ----------------------------------------------------------------------------- workers (subprocesses)


def _build_embedded(spec: dict):
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
    return (model, tok(examples), tok(load_pool(cfg.align.data.harmful)), tokenizer.pad_token_id, cfg.model,
            cfg.align.train, cfg.seed, info)


def _build_deep(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alignshield.config import AlignTrain, LoraSettings, ModelConfig
    from alignshield.data.collate import IGNORE_INDEX, Tokenized
    from alignshield.models.lora import attach_lora

    d = spec["deep"]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["deep_dtype"]]
    config = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                         num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["heads"],
                         max_position_embeddings=max(256, d["seq"]), tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=dtype), LoraSettings())
    g = torch.Generator().manual_seed(1)

    def random_set(n):  # first half "prompt" (masked), second half "answer" (labelled), like the real data
        out = []
        for _ in range(n):
            ids = torch.randint(0, d["vocab"], (d["seq"],), generator=g).tolist()
            half = d["seq"] // 2
            out.append(Tokenized(ids, [IGNORE_INDEX] * half + ids[half:]))
        return out

    info = {"model_desc": (f"Llama {d['layers']}L h{d['hidden']} mlp{d['intermediate']} heads{d['heads']} "
                           f"vocab{d['vocab']} (random init, random ids)"),
            "dtype": spec["deep_dtype"], "lora": f"r={LoraSettings().r} on {','.join(LoraSettings().target_modules)}"}
    train = AlignTrain(batch_size=d["batch"], max_length=d["seq"])
    return model, random_set(64), random_set(64), 0, ModelConfig(name="deep"), train, 42, info


def _method(spec: dict):
    from alignshield.align.tvaccine import TVaccineParams, TVaccineTrainer
    from alignshield.align.vaccine import RandomVaccineTrainer, VaccineParams, VaccineTrainer
    from alignshield.config import MethodParams
    from alignshield.train import Trainer

    name = spec["method"]
    if name == "sft":
        return Trainer, MethodParams()
    if name == "vaccine":
        return VaccineTrainer, VaccineParams(refresh_every=1)
    if name == "vaccine-fast":
        return VaccineTrainer, VaccineParams(refresh_every=spec["fast_k"])
    if name == "random-vaccine":
        return RandomVaccineTrainer, VaccineParams()
    if name == "t-vaccine":
        return TVaccineTrainer, TVaccineParams(layers_per_step=spec["tv_layers"])
    if name == "reference-vaccine":
        return reference_vaccine_class(), VaccineParams()
    from alignshield.align import ALIGN_METHODS
    from alignshield.finetune import FINETUNE_METHODS

    registry = ALIGN_METHODS if name in ALIGN_METHODS else FINETUNE_METHODS
    cls = registry.get(name)
    return cls, getattr(cls, "Params", MethodParams)()


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


def worker(spec: dict) -> dict:
    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    import alignshield.align  # noqa: F401  (registers the methods)
    import alignshield.finetune  # noqa: F401

    hf_logging.set_verbosity_error()
    t_build = time.perf_counter()
    build = _build_embedded if spec["model"] == "embedded" else _build_deep
    model, train_set, harmful, pad_id, model_cfg, settings, seed, info = build(spec)
    cls, params = _method(spec)
    warm, timed = spec["warmup"], spec["steps"]
    if spec["method"] == "vaccine-fast":
        timed = max(timed, spec["fast_k"])  # a whole refresh period: at least one refresh step is timed
    settings = settings.model_copy(update={"max_steps": warm + timed, "checkpoint_every": 10**9})
    sampler = RSSSampler()
    window = Window(sampler)
    marks: list[tuple[float, float]] = []  # (wall, process CPU time) at the start of each step
    state: dict = {}

    class Timed(cls):
        def on_step_start(self):
            if self.step == warm:  # the timed window starts, after the warm-up steps' memory is released
                state["warmup_peak"] = window.peak()
                _trim()
                state["rss_timed_start"] = _rss_mb()
                window.start()
            marks.append((time.perf_counter(), time.process_time()))
            super().on_step_start()

    score_calls: list[tuple[float, float]] = []  # (wall, CPU) of each layer_scores() call in training
    result: dict = {}
    with tempfile.TemporaryDirectory() as work:
        trainer = Timed(model, train_set, settings, params, seed=seed, workdir=Path(work), pad_token_id=pad_id,
                        extra_data={"harmful": harmful, "alignment": train_set}, model_config=model_cfg, progress=False)
        if spec["method"] == "t-vaccine":
            original = trainer.layer_scores

            def timed_scores():
                t0, c0 = time.perf_counter(), time.process_time()
                out = original()
                score_calls.append((time.perf_counter() - t0, time.process_time() - c0))
                return out

            trainer.layer_scores = timed_scores
        _trim()
        baseline = _rss_mb()
        t_train = time.perf_counter()
        sampler.start()
        window.start()
        trainer.train()
        marks.append((time.perf_counter(), time.process_time()))
        peak, peak_sampled = window.peak()
        t_after = time.perf_counter()
        if spec["method"] == "t-vaccine":
            active = list(trainer.active)
            checkpointed = [i for i, layer in enumerate(trainer.layout.layers) if "forward" in layer.__dict__]
            score_s = score_cpu = score_peak_mb = score_step_mb = None
            if spec.get("remeasure_scoring", True):
                # the scoring pass on its own (warm): it ran in warm-up step 0 and runs again every K steps
                _trim()
                score_start = _rss_mb()
                window.start()
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.layer_scores()
                score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
                score_peak, _ = window.peak()
                score_peak_mb, score_step_mb = score_peak - baseline, score_peak - score_start
            else:  # --quick: the step-0 call (cold, timed by the wrapper); its memory is in the warm-up peak
                score_s, score_cpu = score_calls[0]
            result |= {
                "score_seconds": score_s, "score_cpu_seconds": score_cpu,
                "score_seconds_step0": score_calls[0][0] if score_calls else None,
                "score_remeasured": spec.get("remeasure_scoring", True),
                "score_every": trainer.params.score_every, "resample_every": trainer.params.resample_every,
                "layers_per_step": trainer.n_active, "score_batch_size": trainer.params.score_batch_size,
                "score_peak_mb": score_peak_mb, "score_step_mb": score_step_mb,
                "active_layers": active, "checkpointed_layers": checkpointed,
            }
        sampler.stop()
        n_layers = len(trainer.layout) if hasattr(trainer, "layout") else len(trainer.discover_layers().layers)
        trainable = sum(p.numel() for p in trainer.trainable)
        widths = [len(t.input_ids) for t in train_set]

    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    wall = _per_step(walls[warm:], warm, spec["method"], spec,
                     {"score": result.get("score_seconds"), "score_every": result.get("score_every")})
    cpu = _per_step(cpus[warm:], warm, spec["method"], spec,
                    {"score": result.get("score_cpu_seconds"), "score_every": result.get("score_every")})
    result |= {
        "method": spec["method"], "model": spec["model"], "ok": True,
        "seconds_per_step": wall["per_step"], "cpu_seconds_per_step": cpu["per_step"],
        "wall": wall, "cpu": cpu,
        "step_seconds": walls[warm:], "warmup_step_seconds": walls[:warm], "cpu_step_seconds": cpus[warm:],
        "baseline_rss_mb": baseline, "timed_start_mb": state["rss_timed_start"] - baseline,
        "peak_mb": peak - baseline, "peak_mb_sampled": peak_sampled - baseline,
        "step_mb": peak - state["rss_timed_start"], "warmup_peak_mb": state["warmup_peak"][0] - baseline,
        "memory_method": "VmHWM reset via /proc/self/clear_refs" if window.hwm_ok else "VmRSS sampled every 2 ms",
        "threads": torch.get_num_threads(), "batch": settings.batch_size, "max_length": settings.max_length,
        "timed_steps": timed, "warmup_steps": warm,
        "mean_example_tokens": round(statistics.fmean(widths), 1), "n_layers": n_layers,
        "trainable_params": trainable,
        "phases_s": {"imports": t_build - t_import, "build": t_train - t_build, "train": t_after - t_train,
                     "after": time.perf_counter() - t_after},
        **info,
    }
    return result


def run_worker(spec: dict, threads: int, mmap_malloc: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")] if p))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see --help: spinning OpenMP threads collapse on a shared CPU
    if mmap_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        sys.stderr.write(f"--- {spec['method']} on {spec['model']} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}\n")
        return {"method": spec["method"], "model": spec["model"], "ok": False, "error": tail[0][:300],
                "worker_wall_s": wall}
    return json.loads(lines[-1]) | {"worker_wall_s": wall}


def combine_rounds(runs: list[dict], spec: dict) -> dict:
    """One result from several rounds of the same worker: step times pooled, memory the largest peak."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    if len(ok) == 1:
        return ok[0] | {"rounds": 1}
    out = dict(ok[0])
    warm = out["warmup_steps"]
    method = out["method"]
    if method == "vaccine-fast":  # pool refresh and reuse steps separately
        k = spec["fast_k"]
        for key, src in (("wall", "step_seconds"), ("cpu", "cpu_step_seconds")):
            refresh = [d for r in ok for i, d in enumerate(r[src], start=warm) if i % k == 0]
            reuse = [d for r in ok for i, d in enumerate(r[src], start=warm) if i % k != 0]
            med_r, med_u = statistics.median(refresh), statistics.median(reuse)
            out[key] = {"median": statistics.median(refresh + reuse), "mean": statistics.fmean(refresh + reuse),
                        "median_refresh": med_r, "median_reuse": med_u, "per_step": (med_r + (k - 1) * med_u) / k}
    else:
        for key, src, score in (("wall", "step_seconds", "score_seconds"), ("cpu", "cpu_step_seconds", "score_cpu_seconds")):
            pooled = [d for r in ok for d in r[src]]
            out[key] = {"median": statistics.median(pooled), "mean": statistics.fmean(pooled)}
            out[key]["per_step"] = out[key]["median"]
            if method == "t-vaccine":
                s = statistics.median([r[score] for r in ok])
                out[key]["excl_scoring"] = out[key]["median"]
                out[key]["per_step"] = out[key]["median"] + s / out["score_every"]
                out[score] = s
    out["seconds_per_step"], out["cpu_seconds_per_step"] = out["wall"]["per_step"], out["cpu"]["per_step"]
    for key in ("step_seconds", "cpu_step_seconds", "warmup_step_seconds"):
        out[key] = [d for r in ok for d in r[key]]
    for key in ("peak_mb", "peak_mb_sampled", "step_mb", "warmup_peak_mb", "score_peak_mb", "score_step_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = max(values)
    out["rounds"] = len(ok)
    out["worker_wall_s"] = sum(r["worker_wall_s"] for r in runs)
    return out


# ----------------------------------------------------------------------------- main


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def _get(results, model, method, key="seconds_per_step"):
    r = results.get(model, {}).get(method)
    return r.get(key) if r and r.get("ok") else None


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="deep model only, smaller shapes (24 layers, h128, 4 x 96 tokens), 1 warm-up + 2 timed "
                         "steps, T-Vaccine's scoring timed at step 0 only (< 60 s on 2 cores); the embedded model "
                         "is skipped unless --models names it")
    ap.add_argument("--models", default=None, help="comma list of embedded,deep (default both; quick: deep)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list (default the six above; 'baselines' = sft + " + ",".join(BASELINES) + ")")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per worker (default 6, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the method list this many times, interleaved, and pool the step times (shared CPUs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads per worker (default: all cores)")
    ap.add_argument("--fast-k", type=int, default=5, help="vaccine-fast refresh_every (default 5)")
    ap.add_argument("--tv-layers", type=int, default=8, help="T-Vaccine S, layers per step (default 8)")
    ap.add_argument("--embedded-seq", type=int, default=None, help="embedded max_length (default 128, quick 64)")
    ap.add_argument("--deep-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--malloc-mmap", action="store_true",
                    help="MALLOC_MMAP_THRESHOLD_=65536 in the workers: RSS follows live tensors exactly, but steps "
                         "run 2-4x slower, so use it to check the memory columns, not the times")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    t_start = time.perf_counter()
    models = args.models.split(",") if args.models else (["deep"] if args.quick else MODELS)
    methods = ["sft", *BASELINES] if args.methods == "baselines" else args.methods.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for m in methods:
        if m not in METHODS + BASELINES:
            ap.error(f"unknown method {m!r}; known: {', '.join(METHODS + BASELINES)}")
    steps = args.steps or (2 if args.quick else 6)
    warmup = args.warmup if args.warmup is not None else 1
    deep = DEEP_QUICK if args.quick else DEEP
    base = {"steps": steps, "warmup": warmup, "threads": args.threads, "fast_k": args.fast_k,
            "tv_layers": args.tv_layers, "deep": deep, "deep_dtype": args.deep_dtype,
            "remeasure_scoring": not args.quick}
    shapes = {"embedded": {"batch": 8, "seq": args.embedded_seq or (64 if args.quick else 128)},
              "deep": {"batch": deep["batch"], "seq": deep["seq"]}}
    notes = []
    if args.quick and "embedded" not in models:
        notes.append("--quick skips the embedded model (its 6 workers do not fit in 60 s on 2 cores); "
                     "run without --quick, or pass --models embedded,deep")
    if args.malloc_mmap:
        notes.append("--malloc-mmap: memory columns follow live tensors; times are slowed by mmap/munmap, "
                     "do not compare them")

    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for model in models:
            for method in methods:
                spec = base | shapes[model] | {"model": model, "method": method}
                print(f"[{time.perf_counter() - t_start:5.0f} s] round {r + 1}/{args.rounds}: {method} on {model} ...",
                      file=sys.stderr, flush=True)
                runs.setdefault((model, method), []).append(run_worker(spec, args.threads, args.malloc_mmap))
    results = {model: {method: combine_rounds(runs[model, method], base)
                       for method in methods} for model in models}

    # ------------------------------------------------------------------ table
    wall_total = time.perf_counter() - t_start
    print(f"\nalign_cost: {'quick' if args.quick else 'full'}; {steps} timed steps after {warmup} warm-up "
          f"(vaccine-fast: >= k); {args.rounds} round(s); {args.threads} thread(s); wall {wall_total:.0f} s")
    for note in notes:
        print(f"note: {note}")
    header = (f"{'method':<18} {'model':<9} {'s/step':>7} {'x sft':>6} {'cpu s':>7} {'x sft':>6} {'cores':>5} "
              f"{'peak MB':>8} {'x sft':>6} {'step MB':>8} {'x sft':>6}  notes")
    print(header)
    print("-" * len(header))
    for model in models:
        sft = results[model].get("sft", {})
        for method in methods:
            r = results[model][method]
            if not r.get("ok"):
                print(f"{method:<18} {model:<9} FAILED: {r.get('error')}")
                continue

            def rel(key):
                return _fmt(_ratio(r.get(key), sft.get(key)) if sft.get("ok") else None, ".2f")

            detail = ""
            if method == "vaccine-fast":
                detail = (f"amortized over k={args.fast_k}: refresh step {r['wall']['median_refresh']:.3f} s, "
                          f"reuse step {r['wall']['median_reuse']:.3f} s")
            if method == "t-vaccine":
                scoring_mem = (f"scoring peak {r['score_peak_mb']:.0f} MB" if r.get("score_peak_mb") is not None
                               else "scoring timed at step 0, cold; its memory is not measured apart")
                detail = (f"{r['wall']['excl_scoring']:.3f} s/step excl. scoring + scoring {r['score_seconds']:.2f} s"
                          f" / K={r['score_every']}; {scoring_mem}; active layers {r['active_layers']}")
            if method == "reference-vaccine":
                detail = "port of git-disl/Vaccine's step, timing only"
            cores = sum(r["cpu_step_seconds"]) / sum(r["step_seconds"])
            print(f"{method:<18} {model:<9} {r['seconds_per_step']:7.3f} {rel('seconds_per_step'):>6} "
                  f"{r['cpu_seconds_per_step']:7.3f} {rel('cpu_seconds_per_step'):>6} {cores:5.2f} {r['peak_mb']:8.0f} "
                  f"{rel('peak_mb'):>6} {r['step_mb']:8.0f} {rel('step_mb'):>6}  {detail}")
    for model in models:
        r = next((x for x in results[model].values() if x.get("ok")), None)
        if r:
            print(f"{model}: {r['model_desc']}, {r['dtype']}, LoRA {r['lora']}, batch {r['batch']} x max_length "
                  f"{r['max_length']} (mean example {r['mean_example_tokens']} tokens), {r['n_layers']} layers, "
                  f"{r['trainable_params']} trainable params")
    mem_method = next((x["memory_method"] for m in results.values() for x in m.values() if x.get("ok")), None)
    print("s/step: median wall time per optimizer step; cpu s: the same in process CPU time (all threads); "
          "cores: CPU / wall over the timed steps. If cores differs between rows, the load changed between workers "
          "and the wall ratios are skewed; with --threads 1 the CPU-time ratios are the steadiest")
    print(f"peak MB: peak RSS in the timed steps minus RSS right before train(); step MB: minus RSS at the start of "
          f"the timed steps (excludes optimizer state and one-time runtime buffers); {mem_method}; malloc "
          f"{'MALLOC_MMAP_THRESHOLD_=65536' if args.malloc_mmap else 'default, trimmed before each window'}")

    # ------------------------------------------------------------------ summary
    primary = "embedded" if "embedded" in models and _get(results, "embedded", "sft") else "deep"

    def time_ratios(model, key):
        t = {m: _get(results, model, m, key) for m in METHODS + BASELINES}
        baselines = {f"{m}_over_sft_time": _ratio(t[m], t["sft"]) for m in BASELINES if t[m] is not None}
        return baselines | {
            "vaccine_over_sft_time": _ratio(t["vaccine"], t["sft"]),
            "reference_vaccine_over_sft_time": _ratio(t["reference-vaccine"], t["sft"]),
            "fast_vaccine_over_sft_time": _ratio(t["vaccine-fast"], t["sft"]),
            "random_vaccine_over_sft_time": _ratio(t["random-vaccine"], t["sft"]),
            "tvaccine_over_sft_time": _ratio(t["t-vaccine"], t["sft"]),
            "vaccine_over_reference_time": _ratio(t["vaccine"], t["reference-vaccine"]),
        }

    tv = results.get("deep", {}).get("t-vaccine", {})
    tv_peak = max(tv["peak_mb"], tv.get("score_peak_mb") or 0) if tv.get("ok") else None
    summary = {"time_ratios_model": primary, **time_ratios(primary, "seconds_per_step"),
               "tvaccine_over_vaccine_peak_mem": _ratio(tv_peak, _get(results, "deep", "vaccine", "peak_mb")),
               "tvaccine_over_vaccine_step_mem": _ratio(_get(results, "deep", "t-vaccine", "step_mb"),
                                                        _get(results, "deep", "vaccine", "step_mb")),
               "mem_ratios_model": "deep" if "deep" in models else None}
    cpu_ratios = time_ratios(primary, "cpu_seconds_per_step")
    goals = {}
    for key, bound in GOALS.items():
        wall_v = summary.get(key)
        cpu_v = summary.get(key) if "mem" in key else cpu_ratios.get(key)
        goals[key] = {"bound": bound, "wall": wall_v, "cpu": cpu_v,
                      "met_wall": None if wall_v is None else wall_v <= bound,
                      "met_cpu": None if cpu_v is None else cpu_v <= bound}
    print("goals (reported, not asserted):")

    def verdict(value, bound):
        return "n/a" if value is None else f"{value:.2f} {'met' if value <= bound else 'NOT met'}"

    for key, g in goals.items():
        if "mem" in key:
            print(f"  {key} <= {g['bound']}: {verdict(g['wall'], g['bound'])}")
        else:
            print(f"  {key} <= {g['bound']}: wall {verdict(g['wall'], g['bound'])}; "
                  f"cpu {verdict(g['cpu'], g['bound'])}")
    keep = ("seconds_per_step", "cpu_seconds_per_step", "wall", "cpu", "peak_mb", "peak_mb_sampled", "step_mb",
            "timed_start_mb", "warmup_peak_mb", "baseline_rss_mb", "step_seconds", "cpu_step_seconds",
            "warmup_step_seconds", "score_seconds", "score_cpu_seconds", "score_seconds_step0", "score_peak_mb",
            "score_step_mb", "score_every", "resample_every", "layers_per_step", "score_batch_size", "active_layers",
            "checkpointed_layers", "phases_s", "rounds", "error", "worker_wall_s")

    def rounded(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, list):
            return [rounded(x) for x in v]
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return v

    per_model = {}
    for model in models:
        per_model[model] = {"time_ratios": time_ratios(model, "seconds_per_step"),
                            "cpu_time_ratios": time_ratios(model, "cpu_seconds_per_step")}
        for method, r in results[model].items():
            per_model[model][method] = {k: rounded(v) for k, v in r.items() if k in keep}
        r = next((x for x in results[model].values() if x.get("ok")), {})
        per_model[model]["setup"] = {k: r.get(k) for k in ("model_desc", "dtype", "lora", "batch", "max_length",
                                                           "mean_example_tokens", "n_layers", "trainable_params",
                                                           "threads", "memory_method")}
    summary |= {
        "cpu_time_ratios": cpu_ratios,
        "goals": goals, "results": per_model,
        "settings": {"quick": args.quick, "models": models, "methods": methods, "steps": steps, "warmup": warmup,
                     "rounds": args.rounds, "threads": args.threads, "fast_k": args.fast_k,
                     "tv_layers": args.tv_layers, "tv_score_every": tv.get("score_every"),
                     "tv_resample_every": tv.get("resample_every"), "shapes": shapes, "deep": deep,
                     "deep_dtype": args.deep_dtype, "cpu_count": os.cpu_count(), "malloc_mmap": args.malloc_mmap,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                     "timing": "median wall s/step over the timed steps; vaccine-fast amortized over k; "
                               "t-vaccine includes scoring / K",
                     "memory": "VmHWM over the timed steps minus RSS before train() (peak_mb) or at the start of "
                               "the timed steps (step_mb), malloc_trim before each; t-vaccine peak = max(train, "
                               "scoring)"},
        "notes": notes, "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
