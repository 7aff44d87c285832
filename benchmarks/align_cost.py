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
* ``reference-vaccine`` a port (_align_cost_reference.py) of git-disl/Vaccine's two-full-pass step (timing only)
* any other registered align or finetune method by name (``repnoise``, ``booster``, ``tar``, ``lox``, ``ewc``, ``kl``,
  ``vlguard``, ``lisa``, ``ldifs``, ``surgery``, ``asft``; ``--methods baselines`` runs sft and all of them), with its
  default params; fine-tune-stage methods get the same alignment examples as their ``alignment`` data. A method
  that reads the alignment LoRA (#1) (``asft``) gets what the fine-tune stage gives it: the model's LoRA trained
  as LoRA #1 by sft for ``--align-steps`` steps (default 2) on those examples and saved, the base with it
  merged, a fresh LoRA #2 (same settings) to train; AsFT's penalty and its backward are also timed apart

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
# This file: the options, running the workers, the table, the goals summary and the JSON. Next to it:
# _align_cost_rows.py (the method rows, models, ratios and goals, as data), _align_cost_worker.py (what
# runs in each worker: models, memory, timing) and _align_cost_reference.py (the reference-vaccine port).

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _align_cost_rows import ALIGN_STEPS, BASELINES, DEEP, DEEP_QUICK, GOALS, METHODS, MODELS, TIME_RATIOS, shapes

ROOT = Path(__file__).resolve().parents[1]
# what the JSON keeps of each worker's result, and of its setup
KEEP = ("seconds_per_step", "cpu_seconds_per_step", "wall", "cpu", "peak_mb", "peak_mb_sampled", "step_mb",
        "timed_start_mb", "warmup_peak_mb", "baseline_rss_mb", "step_seconds", "cpu_step_seconds",
        "warmup_step_seconds", "score_seconds", "score_cpu_seconds", "score_seconds_step0", "score_peak_mb",
        "score_step_mb", "score_every", "resample_every", "layers_per_step", "score_batch_size", "active_layers",
        "checkpointed_layers", "penalty_seconds", "penalty_cpu_seconds", "anchored", "unanchored", "align_steps",
        "align_lora_s", "phases_s", "rounds", "error", "worker_wall_s")
SETUP = ("model_desc", "dtype", "lora", "batch", "max_length", "mean_example_tokens", "n_layers", "trainable_params",
         "threads", "memory_method")


# ----------------------------------------------------------------------------- options


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--align-steps", type=int, default=ALIGN_STEPS,
                    help=f"sft steps that train LoRA #1 for a method that reads it (asft; default {ALIGN_STEPS}; "
                         "untimed: the method's step cost does not depend on them)")
    ap.add_argument("--embedded-seq", type=int, default=None, help="embedded max_length (default 128, quick 64)")
    ap.add_argument("--deep-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--malloc-mmap", action="store_true",
                    help="MALLOC_MMAP_THRESHOLD_=65536 in the workers: RSS follows live tensors exactly, but steps "
                         "run 2-4x slower, so use it to check the memory columns, not the times")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


@dataclass
class Plan:
    """What one run measures and how: the parsed options, resolved."""

    args: argparse.Namespace
    models: list[str]
    methods: list[str]
    steps: int
    warmup: int
    deep: dict
    shapes: dict
    notes: list[str]

    @property
    def base(self) -> dict:
        """The part of the worker spec every worker shares."""
        a = self.args
        return {"steps": self.steps, "warmup": self.warmup, "threads": a.threads, "fast_k": a.fast_k,
                "tv_layers": a.tv_layers, "align_steps": a.align_steps, "deep": self.deep, "deep_dtype": a.deep_dtype,
                "remeasure_scoring": not a.quick}


def make_plan(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """Models and methods checked (``ap.error`` on an unknown one), defaults filled in, notes written."""
    models = args.models.split(",") if args.models else (["deep"] if args.quick else MODELS)
    methods = ["sft", *BASELINES] if args.methods == "baselines" else args.methods.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for m in methods:
        if m not in METHODS + BASELINES:
            ap.error(f"unknown method {m!r}; known: {', '.join(METHODS + BASELINES)}")
    if args.align_steps < 1:
        ap.error("--align-steps must be >= 1 (LoRA #1 untrained is zero: no alignment subspace to read)")
    notes = []
    if args.quick and "embedded" not in models:
        notes.append("--quick skips the embedded model (its 6 workers do not fit in 60 s on 2 cores); "
                     "run without --quick, or pass --models embedded,deep")
    if args.malloc_mmap:
        notes.append("--malloc-mmap: memory columns follow live tensors; times are slowed by mmap/munmap, "
                     "do not compare them")
    return Plan(args, models, methods, steps=args.steps or (2 if args.quick else 6),
                warmup=args.warmup if args.warmup is not None else 1, deep=DEEP_QUICK if args.quick else DEEP,
                shapes=shapes(args.quick, args.embedded_seq), notes=notes)


# ----------------------------------------------------------------------------- running the workers


def run_worker(spec: dict, threads: int, mmap_malloc: bool = False) -> dict:
    """One worker subprocess (``--worker``); its result, or {"ok": False, "error": ...} if it failed."""
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


def run_all(plan: Plan, t_start: float) -> dict:
    """Every (model, method) worker, ``--rounds`` times interleaved; results[model][method], rounds combined."""
    args, base = plan.args, plan.base
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for model in plan.models:
            for method in plan.methods:
                spec = base | plan.shapes[model] | {"model": model, "method": method}
                print(f"[{time.perf_counter() - t_start:5.0f} s] round {r + 1}/{args.rounds}: {method} on {model} ...",
                      file=sys.stderr, flush=True)
                runs.setdefault((model, method), []).append(run_worker(spec, args.threads, args.malloc_mmap))
    return {model: {method: combine_rounds(runs[model, method], base)
                    for method in plan.methods} for model in plan.models}


def _pool_refresh(per_round: list[list[float]], warm: int, k: int) -> dict:
    """vaccine-fast's step times over rounds: refresh and reuse steps pooled apart, amortized over k."""
    refresh = [d for steps in per_round for i, d in enumerate(steps, start=warm) if i % k == 0]
    reuse = [d for steps in per_round for i, d in enumerate(steps, start=warm) if i % k != 0]
    med_r, med_u = statistics.median(refresh), statistics.median(reuse)
    return {"median": statistics.median(refresh + reuse), "mean": statistics.fmean(refresh + reuse),
            "median_refresh": med_r, "median_reuse": med_u, "per_step": (med_r + (k - 1) * med_u) / k}


def _pool_times(out: dict, ok: list[dict], spec: dict) -> None:
    """out["wall"] and out["cpu"] from the pooled step times of every round (t-vaccine: + median scoring / K)."""
    for key, src, score in (("wall", "step_seconds", "score_seconds"),
                            ("cpu", "cpu_step_seconds", "score_cpu_seconds")):
        if out["method"] == "vaccine-fast":
            out[key] = _pool_refresh([r[src] for r in ok], out["warmup_steps"], spec["fast_k"])
            continue
        pooled = [d for r in ok for d in r[src]]
        out[key] = {"median": statistics.median(pooled), "mean": statistics.fmean(pooled)}
        out[key]["per_step"] = out[key]["median"]
        if out["method"] == "t-vaccine":
            s = statistics.median([r[score] for r in ok])
            out[key]["excl_scoring"] = out[key]["median"]
            out[key]["per_step"] = out[key]["median"] + s / out["score_every"]
            out[score] = s


def combine_rounds(runs: list[dict], spec: dict) -> dict:
    """One result from several rounds of the same worker: step times pooled, memory the largest peak."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    if len(ok) == 1:
        return ok[0] | {"rounds": 1}
    out = dict(ok[0])
    _pool_times(out, ok, spec)
    out["seconds_per_step"], out["cpu_seconds_per_step"] = out["wall"]["per_step"], out["cpu"]["per_step"]
    for key in ("step_seconds", "cpu_step_seconds", "warmup_step_seconds"):
        out[key] = [d for r in ok for d in r[key]]
    for key in ("peak_mb", "peak_mb_sampled", "step_mb", "warmup_peak_mb", "score_peak_mb", "score_step_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = max(values)
    for key in ("penalty_seconds", "penalty_cpu_seconds"):  # asft's penalty, timed apart in each round
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    out["rounds"] = len(ok)
    out["worker_wall_s"] = sum(r["worker_wall_s"] for r in runs)
    return out


# ----------------------------------------------------------------------------- the table


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def _get(results, model, method, key="seconds_per_step"):
    r = results.get(model, {}).get(method)
    return r.get(key) if r and r.get("ok") else None


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _fast_detail(r: dict, args) -> str:
    return (f"amortized over k={args.fast_k}: refresh step {r['wall']['median_refresh']:.3f} s, "
            f"reuse step {r['wall']['median_reuse']:.3f} s")


def _tvaccine_detail(r: dict, args) -> str:
    scoring_mem = (f"scoring peak {r['score_peak_mb']:.0f} MB" if r.get("score_peak_mb") is not None
                   else "scoring timed at step 0, cold; its memory is not measured apart")
    return (f"{r['wall']['excl_scoring']:.3f} s/step excl. scoring + scoring {r['score_seconds']:.2f} s"
            f" / K={r['score_every']}; {scoring_mem}; active layers {r['active_layers']}")


def _asft_detail(r: dict, args) -> str:
    share = r["penalty_seconds"] / r["seconds_per_step"]
    return (f"penalty + its backward {1000 * r['penalty_seconds']:.1f} ms ({100 * share:.2f} % of the step; timed "
            f"apart, median of 5) over {r['anchored']} anchored modules ({r['unanchored']} unanchored); "
            f"LoRA #1 from {r['align_steps']} sft steps")


# the table's notes column, by method
DETAILS = {
    "asft": _asft_detail,
    "vaccine-fast": _fast_detail,
    "t-vaccine": _tvaccine_detail,
    "reference-vaccine": lambda r, args: "port of git-disl/Vaccine's step, timing only",
}


def _table_row(method: str, model: str, r: dict, sft: dict, args) -> str:
    if not r.get("ok"):
        return f"{method:<18} {model:<9} FAILED: {r.get('error')}"

    def rel(key):
        return _fmt(_ratio(r.get(key), sft.get(key)) if sft.get("ok") else None, ".2f")

    detail = DETAILS[method](r, args) if method in DETAILS else ""
    cores = sum(r["cpu_step_seconds"]) / sum(r["step_seconds"])
    return (f"{method:<18} {model:<9} {r['seconds_per_step']:7.3f} {rel('seconds_per_step'):>6} "
            f"{r['cpu_seconds_per_step']:7.3f} {rel('cpu_seconds_per_step'):>6} {cores:5.2f} {r['peak_mb']:8.0f} "
            f"{rel('peak_mb'):>6} {r['step_mb']:8.0f} {rel('step_mb'):>6}  {detail}")


def _first_ok(results: dict, model: str, default=None):
    return next((x for x in results[model].values() if x.get("ok")), default)


def print_table(plan: Plan, results: dict, wall_total: float) -> None:
    """The heading, one row per (model, method), each model's setup, and what the columns mean."""
    args = plan.args
    print(f"\nalign_cost: {'quick' if args.quick else 'full'}; {plan.steps} timed steps after {plan.warmup} warm-up "
          f"(vaccine-fast: >= k); {args.rounds} round(s); {args.threads} thread(s); wall {wall_total:.0f} s")
    for note in plan.notes:
        print(f"note: {note}")
    header = (f"{'method':<18} {'model':<9} {'s/step':>7} {'x sft':>6} {'cpu s':>7} {'x sft':>6} {'cores':>5} "
              f"{'peak MB':>8} {'x sft':>6} {'step MB':>8} {'x sft':>6}  notes")
    print(header)
    print("-" * len(header))
    for model in plan.models:
        for method in plan.methods:
            print(_table_row(method, model, results[model][method], results[model].get("sft", {}), args))
    for model in plan.models:
        r = _first_ok(results, model)
        if r:
            print(f"{model}: {r['model_desc']}, {r['dtype']}, LoRA {r['lora']}, batch {r['batch']} x max_length "
                  f"{r['max_length']} (mean example {r['mean_example_tokens']} tokens), {r['n_layers']} layers, "
                  f"{r['trainable_params']} trainable params")
    _print_legend(results, args.malloc_mmap)


def _print_legend(results: dict, malloc_mmap: bool) -> None:
    mem_method = next((x["memory_method"] for m in results.values() for x in m.values() if x.get("ok")), None)
    print("s/step: median wall time per optimizer step; cpu s: the same in process CPU time (all threads); "
          "cores: CPU / wall over the timed steps. If cores differs between rows, the load changed between workers "
          "and the wall ratios are skewed; with --threads 1 the CPU-time ratios are the steadiest")
    print(f"peak MB: peak RSS in the timed steps minus RSS right before train(); step MB: minus RSS at the start of "
          f"the timed steps (excludes optimizer state and one-time runtime buffers); {mem_method}; malloc "
          f"{'MALLOC_MMAP_THRESHOLD_=65536' if malloc_mmap else 'default, trimmed before each window'}")


# ----------------------------------------------------------------------------- the goals summary


def time_ratios(results: dict, model: str, key: str) -> dict:
    """Each TIME_RATIOS entry (and <baseline>_over_sft_time for each baseline that ran) in ``key``'s time."""
    t = {m: _get(results, model, m, key) for m in METHODS + BASELINES}
    baselines = {f"{m}_over_sft_time": _ratio(t[m], t["sft"]) for m in BASELINES if t[m] is not None}
    return baselines | {name: _ratio(t[a], t[b]) for name, (a, b) in TIME_RATIOS.items()}


def headline(plan: Plan, results: dict) -> dict:
    """Time ratios on the embedded model (the deep one if embedded's sft did not run), memory on the deep one."""
    primary = "embedded" if "embedded" in plan.models and _get(results, "embedded", "sft") else "deep"
    tv = results.get("deep", {}).get("t-vaccine", {})
    tv_peak = max(tv["peak_mb"], tv.get("score_peak_mb") or 0) if tv.get("ok") else None
    return {"time_ratios_model": primary, **time_ratios(results, primary, "seconds_per_step"),
            "tvaccine_over_vaccine_peak_mem": _ratio(tv_peak, _get(results, "deep", "vaccine", "peak_mb")),
            "tvaccine_over_vaccine_step_mem": _ratio(_get(results, "deep", "t-vaccine", "step_mb"),
                                                     _get(results, "deep", "vaccine", "step_mb")),
            "mem_ratios_model": "deep" if "deep" in plan.models else None}


def goals(summary: dict, cpu_ratios: dict) -> dict:
    """Each goal's bound and its value in wall and CPU time (memory ratios: the same value twice)."""
    out = {}
    for key, bound in GOALS.items():
        wall_v = summary.get(key)
        cpu_v = summary.get(key) if "mem" in key else cpu_ratios.get(key)
        out[key] = {"bound": bound, "wall": wall_v, "cpu": cpu_v,
                    "met_wall": None if wall_v is None else wall_v <= bound,
                    "met_cpu": None if cpu_v is None else cpu_v <= bound}
    return out


def _verdict(value, bound):
    return "n/a" if value is None else f"{value:.2f} {'met' if value <= bound else 'NOT met'}"


def print_goals(goals: dict) -> None:
    print("goals (reported, not asserted):")
    for key, g in goals.items():
        if "mem" in key:
            print(f"  {key} <= {g['bound']}: {_verdict(g['wall'], g['bound'])}")
        else:
            print(f"  {key} <= {g['bound']}: wall {_verdict(g['wall'], g['bound'])}; "
                  f"cpu {_verdict(g['cpu'], g['bound'])}")


# ----------------------------------------------------------------------------- the JSON


def _rounded(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


def per_model(plan: Plan, results: dict) -> dict:
    """Per model: its time ratios, every method's raw numbers (KEEP, rounded) and its setup."""
    out = {}
    for model in plan.models:
        out[model] = {"time_ratios": time_ratios(results, model, "seconds_per_step"),
                      "cpu_time_ratios": time_ratios(results, model, "cpu_seconds_per_step")}
        for method, r in results[model].items():
            out[model][method] = {k: _rounded(v) for k, v in r.items() if k in KEEP}
        r = _first_ok(results, model, {})
        out[model]["setup"] = {k: r.get(k) for k in SETUP}
    return out


def settings(plan: Plan, results: dict) -> dict:
    args, tv = plan.args, results.get("deep", {}).get("t-vaccine", {})
    return {"quick": args.quick, "models": plan.models, "methods": plan.methods, "steps": plan.steps,
            "warmup": plan.warmup, "rounds": args.rounds, "threads": args.threads, "fast_k": args.fast_k,
            "tv_layers": args.tv_layers, "align_steps": args.align_steps, "tv_score_every": tv.get("score_every"),
            "tv_resample_every": tv.get("resample_every"), "shapes": plan.shapes, "deep": plan.deep,
            "deep_dtype": args.deep_dtype, "cpu_count": os.cpu_count(), "malloc_mmap": args.malloc_mmap,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "timing": "median wall s/step over the timed steps; vaccine-fast amortized over k; "
                      "t-vaccine includes scoring / K",
            "memory": "VmHWM over the timed steps minus RSS before train() (peak_mb) or at the start of "
                      "the timed steps (step_mb), malloc_trim before each; t-vaccine peak = max(train, "
                      "scoring)"}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.worker:
        from _align_cost_worker import worker

        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    t_start = time.perf_counter()
    plan = make_plan(ap, args)
    results = run_all(plan, t_start)
    print_table(plan, results, time.perf_counter() - t_start)
    summary = headline(plan, results)
    cpu_ratios = time_ratios(results, summary["time_ratios_model"], "cpu_seconds_per_step")
    summary_goals = goals(summary, cpu_ratios)
    print_goals(summary_goals)
    summary |= {"cpu_time_ratios": cpu_ratios, "goals": summary_goals, "results": per_model(plan, results),
                "settings": settings(plan, results), "notes": plan.notes,
                "wall_seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
