#!/usr/bin/env python
"""How close training and generation run to this machine's limit, and what the speed-ups buy.

    python benchmarks/throughput.py            # embedded model, 2 rounds of 16 align + 16 fine-tune steps
    python benchmarks/throughput.py --quick    # 1 round of 4 + 4 steps, 16 prompts (< 60 s where bf16 is native)
    python benchmarks/throughput.py --dtype float32 --contention   # + step time beside a busy process

What it measures, in one run, on the embedded model (SmolLM2-135M-Instruct, LoRA r = 8 on the 7
projections, as the embedded default trains it):

* **roofline**: the best matmul GFLOPS per dtype on this CPU (a 1024^3 product and the model's own
  MLP shape, measured before and after the rest, the best kept), torch's threads as configured.
* **training**: the same examples trained twice with ``alignshield.train.Trainer``: once as the
  embedded default does (``train.group_by_length``, ``train.sparse_logits`` and ``train.share_prefix``
  on, ``model.adapter_compute=auto``, and the attention kernel this machine resolves to: ``eager``
  where it measured faster than ``sdpa``, models/hardware.py), once with all of them off (the
  baseline: shuffled batches, full-vocabulary logits and autograd's log-softmax at every position,
  every row's prompt computed in full, the LoRA computing in float32, transformers' default ``sdpa``
  attention). Each variant trains one
  window of examples, ``--steps`` batches of 8 of the align stage's data (``align.data.safety`` +
  ``align.data.benign``, max_length 128) and of the fine-tune mix (SST-2 with p = 0.1 harmful), so
  both do the same work but batch it differently. ``speedup_vs_baseline`` is the baseline's time over
  the optimized time for all those steps together; per stage too.
* **FLOPs**: per computed token (a batch's shared prefix counts once), from the model's shapes:
  2 x (weights of the decoder's linear layers +
  LoRA) forward, the same again for the gradient w.r.t. the activations (frozen weights need no
  weight gradient), 2 x LoRA for the LoRA weight gradients, attention scores and values forward and
  backward, and the head (2 x hidden x vocab, forward and backward) at labelled positions only: the
  work a step must do. ``train_fraction_of_roofline`` = those FLOPs per second over the roofline of
  the dtype in use.
* **shape roofline**: the same rate measured on the step's own matmuls, each at its shape (the
  decoder's projections at the rows a step computes, their LoRA products, the head at the labelled
  positions; forward and input gradient), timed alone: ``shape_roofline_gflops``, and
  ``train_fraction_of_shape_roofline`` = training FLOP/s over it. Small products run far below the
  1024^3 peak; this says how much of the gap is theirs and how much is everything else in a step.
* **generation**: the evaluation's greedy answers to ``--prompts`` held-out harmful prompts
  (``evaluate.max_new_tokens``) and twice as many SST-2 test prompts, as the default runs them (shared
  prefixes, ``evaluate.batch_size``) and as the baseline (batch 32, no sharing); harmful-prompt tokens
  per second (up to and including the end token) and ``generate_speedup_vs_baseline``.
* ``--compile layers|mlp``: a third variant, the optimized one with that ``train.compile`` (whole
  decoder layers, without prefix sharing; or their MLP and norms, with it), timed on the same
  windows, interleaved: ``compile.speedup_vs_optimized`` and the first compile's seconds
  (``compile.warmup_s``: tens of seconds on a machine's first compile, a few once inductor's on-disk
  cache holds it).
* ``--contention``: fine-tune steps in a subprocess while another process keeps one core busy, with
  OpenMP's default spin-waiting and with alignshield's ``GOMP_SPINCOUNT`` (see alignshield/__init__.py).

The last line printed is one JSON object with at least ``dtype``, ``roofline_gflops``,
``train_tokens_per_s``, ``train_fraction_of_roofline``, ``generate_tokens_per_s`` and
``speedup_vs_baseline``. The CPU may be shared with other jobs: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"speedup_vs_baseline": 1.8, "train_fraction_of_roofline": 0.5}


def roofline(dtypes: list[str], hidden: int, mlp: int) -> dict[str, float]:
    import torch

    from alignshield.models.hardware import matmul_gflops

    return {d: round(max(matmul_gflops(getattr(torch, d), (1024, 1024, 1024)),
                         matmul_gflops(getattr(torch, d), (1024, hidden, mlp))), 1) for d in dtypes}


def flops_per_token(model, seq_len: float) -> dict[str, float]:
    """Training FLOPs per real token of the decoder (linear layers + LoRA + attention) and of the head
    per position it is computed at (forward + the backward a step needs)."""
    import torch

    base = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in ("lm_head",):
            n = module.weight.numel()
            if "lora_" in name:
                lora += n
            elif ".layers." in name or ".h." in name:
                base += n
    cfg = model.config
    heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attention = 2 * 2 * heads_dim * seq_len / 2 * cfg.num_hidden_layers  # QK^T and AV over ~T/2 keys (causal)
    decoder = 2 * (base + lora) + 2 * (base + lora) + 2 * lora + 3 * attention
    head = 2 * cfg.hidden_size * cfg.vocab_size * 2  # forward + gradient w.r.t. the hidden states
    return {"decoder": decoder, "head": head}


def shape_roofline(model, dtype: str, rows: int, labelled: int) -> dict:
    """The matmul rate a training step's own products reach alone, each timed at its shape (best of a few).

    ``rows``: tokens the decoder computes per step; ``labelled``: head positions per step. Every
    decoder linear layer (in ``k`` -> out ``n``) runs (rows x k) @ (k x n) forward and (rows x n) @ (n x k)
    for the input gradient; its LoRA (rank ``r``) adds two small products each way and the two weight
    gradients; the head runs forward and input gradient at the labelled positions. The rate is their
    total FLOPs over the sum of their times (attention's batched products, ~5 % of the FLOPs, are
    left out), so ``train_gflops_per_s`` over it is how near the step runs to what its matmuls allow."""
    import torch

    from alignshield.models.hardware import matmul_gflops

    shapes: dict[tuple[int, int, int], int] = {}  # (m, k, n) -> how many per step
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)  # a PEFT LoRA layer: its base_layer is the nn.Linear
        plain = isinstance(module, torch.nn.Linear) and not any(s in name for s in ("lora_", "base_layer"))
        if ".layers." not in name or not (lora_a or plain):
            continue
        base = module.base_layer if lora_a else module
        k, n = base.in_features, base.out_features
        r = next(iter(lora_a.values())).out_features if lora_a else 0
        products = [(rows, k, n), (rows, n, k)]
        if r:
            products += [(rows, k, r), (rows, r, n), (rows, n, r), (rows, r, k), (k, rows, r), (r, rows, n)]
        for shape in products:
            shapes[shape] = shapes.get(shape, 0) + 1
    cfg = model.config
    for shape in ((labelled, cfg.hidden_size, cfg.vocab_size), (labelled, cfg.vocab_size, cfg.hidden_size)):
        shapes[shape] = shapes.get(shape, 0) + 1
    torch_dtype = getattr(torch, dtype)
    flops = seconds = 0.0
    per_shape = {}
    for (m, k, n), count in shapes.items():
        gflops = matmul_gflops(torch_dtype, (m, k, n), reps=7, budget_s=0.5)
        per_shape[f"{m}x{k}x{n}"] = round(gflops, 1)
        flops += count * 2 * m * k * n
        seconds += count * 2 * m * k * n / (gflops * 1e9)
    return {"gflops": round(flops / seconds / 1e9, 1), "rows": rows, "labelled": labelled, "per_shape": per_shape}


BASELINE_ATTENTION = "sdpa"  # transformers' default, before alignshield chose the kernel per machine


def time_training(model, initial: dict, data: list, optimized: bool, seed: int, attention: str,
                  compile: str = "none") -> dict:
    """Train ``data`` once (one window, batch 8) from the same initial LoRA; seconds and token counts.
    ``attention``: the optimized variant's kernel (the baseline uses ``BASELINE_ATTENTION``);
    ``compile``: its ``train.compile`` (the ``compiled`` variant)."""
    import torch

    from alignshield.config import ModelConfig, TrainSettings
    from alignshield.train import Trainer, shared_prefix_length

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in initial:
                p.copy_(initial[name])
    model.set_attn_implementation(attention if optimized else BASELINE_ATTENTION)
    steps = len(data) // 8
    args = TrainSettings(learning_rate=1e-4, max_steps=steps, batch_size=8, max_length=128, checkpoint_every=10**6,
                         group_by_length=optimized, sparse_logits=optimized, share_prefix=optimized,
                         compile=compile)
    with tempfile.TemporaryDirectory() as work:
        # the baseline's LoRA computes in float32 beside a bf16 base (PEFT's default), ours autocasts
        precision = ModelConfig(adapter_compute="auto" if optimized else "float32")
        trainer = Trainer(model, data, args, Trainer.Params(), seed=seed, workdir=Path(work), pad_token_id=0,
                          model_config=precision, progress=False)
        batches = [trainer.collate([data[i] for i in idx]) for idx in _batch_indices(trainer, steps)]
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    shared = [shared_prefix_length(b) if optimized else 0 for b in batches]
    padded = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    # tokens the decoder actually computes: a shared prefix once per batch, not once per row
    computed = real - sum((b["input_ids"].shape[0] - 1) * p for b, p in zip(batches, shared))
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return {"seconds": seconds, "steps": steps, "padded_tokens": padded, "real_tokens": real,
            "computed_tokens": computed, "labelled_positions": labelled,
            "shared_prefix_tokens": sum(shared)}


def _batch_indices(trainer, steps: int) -> list[list[int]]:
    order = list(iter(trainer.sampler))
    return [order[i * 8:(i + 1) * 8] for i in range(steps)]


def time_generation(model, tokenizer, cfg, n_prompts: int, attention: str) -> dict:
    """The evaluation's generation (harmful prompts with ``evaluate.max_new_tokens``, then twice as
    many SST-2 test prompts), as the embedded default runs it (shared prefixes, batch
    ``evaluate.batch_size``) and as before this benchmark's changes (no sharing, batch 32)."""
    from alignshield.data.pools import load_pool
    from alignshield.data.templates import render_prompt
    from alignshield.evaluate.generate import generate_batch
    from alignshield.tasks import TASKS

    task = TASKS.get("sst2")
    harmful = [render_prompt(e, cfg.template, tokenizer) for e in load_pool(cfg.evaluate.harmful)[:n_prompts]]
    sst2 = [render_prompt(task.to_example(r), cfg.template, tokenizer) for r in task.rows("test")[:2 * n_prompts]]
    model.eval()
    generate_batch(model, tokenizer, harmful[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up
    out = {}
    for variant, batch, share in (("optimized", cfg.evaluate.batch_size, True), ("baseline", 32, False)):
        model.set_attn_implementation(attention if variant == "optimized" else BASELINE_ATTENTION)
        t0 = time.perf_counter()
        h = generate_batch(model, tokenizer, harmful, max_new_tokens=cfg.evaluate.max_new_tokens, batch_size=batch,
                           share_prefix=share, progress=False)
        h_s = time.perf_counter() - t0
        generate_batch(model, tokenizer, sst2, max_new_tokens=task.max_new_tokens, batch_size=batch,
                       share_prefix=share, progress=False)
        out[variant] = {"seconds": round(time.perf_counter() - t0, 2), "harmful_seconds": round(h_s, 2),
                        "harmful_tokens_per_s": round(sum(h.new_tokens) / h_s, 1), "batch_size": batch,
                        "share_prefix": share, "attention": model.config._attn_implementation}
    out |= {"harmful_prompts": len(harmful), "sst2_prompts": len(sst2), "max_new_tokens": cfg.evaluate.max_new_tokens}
    return out


def load_data(cfg, tokenizer, n: int) -> dict[str, list]:
    from alignshield import stages
    from alignshield.data.mix import build_mix
    from alignshield.data.pools import load_pool
    from alignshield.tasks import TASKS

    align = load_pool(cfg.align.data.safety) + load_pool(cfg.align.data.benign)
    import random

    random.Random(0).shuffle(align)
    mix = build_mix(TASKS.get("sst2").examples("train"), load_pool(cfg.finetune.harmful), 500, 0.1, 0)
    return {"align": stages._tokenize(align[:n], tokenizer, cfg, 128),
            "finetune": stages._tokenize([e for e, _ in mix][:n], tokenizer, cfg, 128)}


def contention(dtype: str) -> dict:
    """Fine-tune s/step with one core kept busy by another process: OpenMP's default spin-wait
    (libgomp spins 300,000 times before it sleeps) vs alignshield's GOMP_SPINCOUNT."""
    from alignshield import OPENMP_SPINCOUNT

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    out = {}
    try:
        for label, spins in (("openmp_default", "300000"), ("alignshield", OPENMP_SPINCOUNT)):
            result = subprocess.run([sys.executable, __file__, "--worker-steps", dtype], capture_output=True,
                                    text=True, check=True, env=dict(os.environ, GOMP_SPINCOUNT=spins))
            out[label] = json.loads(result.stdout.strip().splitlines()[-1])["seconds_per_step"]
    finally:
        busy.kill()
    out["default_over_alignshield"] = round(out["openmp_default"] / out["alignshield"], 2)
    return out


def worker_steps(dtype: str) -> None:
    import torch

    from alignshield.config import load_config
    from alignshield.models.load import load_model, load_tokenizer, resolve_attention
    from alignshield.models.lora import attach_lora

    cfg = load_config(overrides=[f"model.dtype={dtype}"])
    attention = resolve_attention(cfg.model) or BASELINE_ATTENTION
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model), cfg.finetune.lora)
    data = load_data(cfg, tokenizer, 40)["finetune"]
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    time_training(model, initial, data[:8], True, 0, attention)  # warm-up
    r = time_training(model, initial, data[8:40], True, 0, attention)
    print(json.dumps({"seconds_per_step": round(r["seconds"] / r["steps"], 3), "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 4 + 4 steps, 16 prompts")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the dtype to train in (default: model.dtype=auto, this machine's choice)")
    ap.add_argument("--steps", type=int, default=None, help="batches per stage and variant (16; 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="repeat both variants, interleaved (2; 1 with --quick)")
    ap.add_argument("--prompts", type=int, default=None, help="harmful prompts to answer (32; 16 with --quick)")
    ap.add_argument("--contention", action="store_true", help="also time steps beside a busy process")
    ap.add_argument("--compile", choices=["layers", "mlp"], default=None,
                    help="also time a third variant, the optimized one with this train.compile, interleaved")
    ap.add_argument("--worker-steps", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_steps:
        return worker_steps(args.worker_steps)
    steps = args.steps or (4 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 2)
    n_prompts = args.prompts or (16 if args.quick else 32)

    import torch

    from alignshield.config import load_config
    from alignshield.models.hardware import cpu_model
    from alignshield.models.load import load_model, load_tokenizer, resolve_attention, resolve_dtype
    from alignshield.models.lora import attach_lora

    t_start = time.perf_counter()
    cfg = load_config(overrides=[f"model.dtype={args.dtype}"])
    dtype = resolve_dtype(cfg.model)
    cfg.model.dtype = dtype
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model), cfg.align.lora)
    mcfg = model.config
    roof = roofline(["float32", "bfloat16"], mcfg.hidden_size, mcfg.intermediate_size)
    data = load_data(cfg, tokenizer, (1 + steps * rounds) * 8)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    attention = resolve_attention(cfg.model) or BASELINE_ATTENTION
    time_training(model, initial, data["align"][:8], True, 0, attention)  # warm-up: kernels, allocator, imports
    time_training(model, initial, data["finetune"][:8], False, 0, attention)
    variants = ["optimized", "baseline"]
    compile_warmup_s = None
    if args.compile:  # the first compile (inductor; on-disk cache after the first on a machine) is timed apart
        t_compile = time.perf_counter()
        time_training(model, initial, data["align"][:8], True, 0, attention, compile=args.compile)
        compile_warmup_s = round(time.perf_counter() - t_compile, 1)
        variants.insert(1, "compiled")

    runs = {(stage, v): [] for stage in ("align", "finetune") for v in variants}
    for r in range(rounds):
        for stage in ("align", "finetune"):
            window = data[stage][8 * (1 + r * steps): 8 * (1 + (r + 1) * steps)]
            for variant in (variants[::-1] if r % 2 else variants):
                runs[stage, variant].append(time_training(model, initial, window, variant != "baseline", r,
                                                          attention, args.compile if variant == "compiled" else "none"))

    def total(stage, variant, key):
        return sum(x[key] for x in runs[stage, variant])

    seq = sum(total(s, "optimized", "padded_tokens") for s in ("align", "finetune")) / sum(
        total(s, "optimized", "steps") * 8 for s in ("align", "finetune"))
    f = flops_per_token(model, seq)
    per_stage = {}
    for stage in ("align", "finetune"):
        opt_s, base_s = total(stage, "optimized", "seconds"), total(stage, "baseline", "seconds")
        work = total(stage, "optimized", "computed_tokens") * f["decoder"] + total(stage, "optimized",
                                                                                 "labelled_positions") * f["head"]
        per_stage[stage] = {
            "optimized_s_per_step": round(opt_s / total(stage, "optimized", "steps"), 3),
            "baseline_s_per_step": round(base_s / total(stage, "baseline", "steps"), 3),
            "speedup": round(base_s / opt_s, 3),
            "padding_fraction_optimized": round(1 - total(stage, "optimized", "real_tokens")
                                                / total(stage, "optimized", "padded_tokens"), 3),
            "padding_fraction_baseline": round(1 - total(stage, "baseline", "real_tokens")
                                               / total(stage, "baseline", "padded_tokens"), 3),
            "labelled_fraction": round(total(stage, "optimized", "labelled_positions")
                                       / total(stage, "optimized", "real_tokens"), 3),
            "shared_prefix_fraction": round(1 - total(stage, "optimized", "computed_tokens")
                                            / total(stage, "optimized", "real_tokens"), 3),
            "gflops_per_s": round(work / opt_s / 1e9, 1),
            "tokens_per_s": round(total(stage, "optimized", "real_tokens") / opt_s, 1),
        }
        if args.compile:
            per_stage[stage]["compiled_s_per_step"] = round(total(stage, "compiled", "seconds")
                                                            / total(stage, "compiled", "steps"), 3)
            per_stage[stage]["compile_speedup"] = round(opt_s / total(stage, "compiled", "seconds"), 3)
    opt_all = sum(total(s, "optimized", "seconds") for s in per_stage)
    base_all = sum(total(s, "baseline", "seconds") for s in per_stage)
    real_all = sum(total(s, "optimized", "real_tokens") for s in per_stage)
    work_all = sum(per_stage[s]["gflops_per_s"] * total(s, "optimized", "seconds") for s in per_stage)
    achieved = work_all / opt_all

    n_steps = sum(total(s, "optimized", "steps") for s in per_stage)
    shape_roof = shape_roofline(model, dtype, round(sum(total(s, "optimized", "computed_tokens") for s in per_stage) / n_steps),
                                round(sum(total(s, "optimized", "labelled_positions") for s in per_stage) / n_steps))
    gen = time_generation(model.merge_and_unload(), tokenizer, cfg, n_prompts, attention)  # evaluation sees merged models
    roof = {d: max(g, again) for (d, g), again in zip(roof.items(), roofline(list(roof), mcfg.hidden_size,
                                                                          mcfg.intermediate_size).values())}
    result = {
        "dtype": dtype, "attention": attention, "baseline_attention": BASELINE_ATTENTION, "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "roofline_gflops": roof[dtype], "roofline_gflops_per_dtype": roof,
        "train_tokens_per_s": round(real_all / opt_all, 1),
        "train_gflops_per_s": round(achieved, 1),
        "train_fraction_of_roofline": round(achieved / roof[dtype], 3),
        "speedup_vs_baseline": round(base_all / opt_all, 3),
        "shape_roofline_gflops": shape_roof["gflops"],
        "train_fraction_of_shape_roofline": round(achieved / shape_roof["gflops"], 3),
        "shape_roofline": shape_roof,
        "stages": per_stage,
        "flops_per_token": {"decoder_gflop": round(f["decoder"] / 1e9, 4), "head_gflop": round(f["head"] / 1e9, 4)},
        "generate_tokens_per_s": gen["optimized"]["harmful_tokens_per_s"],
        "generate_speedup_vs_baseline": round(gen["baseline"]["seconds"] / gen["optimized"]["seconds"], 3),
        "generate": gen,
        "steps": steps, "rounds": rounds, "quick": args.quick,
    }
    if args.compile:
        compiled_all = sum(total(s, "compiled", "seconds") for s in per_stage)
        result["compile"] = {"mode": args.compile, "warmup_s": compile_warmup_s, "speedup_vs_optimized": round(opt_all / compiled_all, 3),
                             "speedup_vs_baseline": round(base_all / compiled_all, 3),
                             "train_fraction_of_roofline": round(achieved * opt_all / compiled_all / roof[dtype], 3)}
    if args.contention:
        result["contention_s_per_step"] = contention(dtype)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["goals"] = {k: {"goal": v, "met": result[k] >= v} for k, v in GOALS.items()}

    print(f"{result['cpu']}, {dtype}, {attention} attention (baseline {BASELINE_ATTENTION}), {result['threads']} "
          "threads; roofline (matmul GFLOPS): "
          + ", ".join(f"{d} {g}" for d, g in roof.items()))
    for stage, s in per_stage.items():
        print(f"{stage:9s} optimized {s['optimized_s_per_step']:.2f} s/step vs baseline {s['baseline_s_per_step']:.2f}"
              f" ({s['speedup']:.2f}x); padding {s['padding_fraction_optimized']:.0%} vs "
              f"{s['padding_fraction_baseline']:.0%}; shared prefix {s['shared_prefix_fraction']:.0%} of tokens; "
              f"{s['tokens_per_s']:.0f} tokens/s, {s['gflops_per_s']} GFLOP/s")
    print(f"training: {result['train_fraction_of_roofline']:.0%} of the {dtype} roofline; "
          f"speed-up vs baseline {result['speedup_vs_baseline']:.2f}x")
    print(f"the step's own matmuls alone, at their shapes ({shape_roof['rows']} rows, {shape_roof['labelled']} "
          f"labelled): {shape_roof['gflops']} GFLOPS; training reaches "
          f"{result['train_fraction_of_shape_roofline']:.0%} of that")
    if args.compile:
        c = result["compile"]
        print(f"train.compile={c['mode']}: {c['speedup_vs_optimized']:.2f}x the optimized steps ({c['speedup_vs_baseline']:.2f}x the "
              f"baseline, {c['train_fraction_of_roofline']:.0%} of the roofline); first compile {c['warmup_s']} s")
    print(f"evaluation generation: {gen['optimized']['seconds']} s vs baseline {gen['baseline']['seconds']} s "
          f"({result['generate_speedup_vs_baseline']:.2f}x); {result['generate_tokens_per_s']} tokens/s on the "
          f"harmful prompts")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
