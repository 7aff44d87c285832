#!/usr/bin/env python
"""Generation throughput of evaluation: batched (the way ``evaluate`` generates) vs one prompt at a time.

    python benchmarks/eval_throughput.py            # embedded model, 64 harmful prompts, 48 new tokens
    python benchmarks/eval_throughput.py --quick    # 32 prompts, 16 new tokens, 6 sequential (< 60 s)
    python benchmarks/eval_throughput.py --tiny     # a tiny Llama built in code (no model package needed)

The model is the embedded default (``model.name=embedded``, SmolLM2-135M-Instruct in the preset's
bfloat16, loaded through alignshield's normal loader); ``--dtype`` overrides the dtype. The prompts are
real held-out harmful prompts (``evaluate.harmful``: ``beavertails_test``), rendered with the Alpaca
template exactly as evaluation renders them. Both runs call ``alignshield.evaluate.generate.generate_batch``
on the same loaded model with greedy decoding: once with ``--batch-size`` (32, the evaluate default:
length-sorted batches, left padding, KV cache), once with batch size 1 on the first
``--sequential-prompts`` of them (all by default, 6 with ``--quick``: a rate, so a subset estimates
it). A short untimed warm-up runs first. Throughput is generated tokens (up to and including the end
token) per second.

Batched and sequential greedy decoding compute the same function, but padding changes the shapes of
the matrix products, so in bfloat16 a near-tie between two tokens can flip and the answers diverge
from there; ``answers_identical`` is the fraction of the sequentially answered prompts whose two
answers are exactly the same (1.0 expected in float32, a little less in bfloat16). Threads default to
1 (``--threads``). The last line printed is one JSON object with at least
``batched_over_sequential_speed``. The CPU may be shared: rerun to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 5.0  # batched >= 5x the sequential tokens/s


def _tiny_model_dir(root: Path) -> Path:
    """A 4-layer tiny Llama and its BPE tokenizer, saved like any checkpoint (tests/conftest.py's)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer

    path = root / "tiny-llama"
    make_model("llama", layers=4).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _timed(model, tokenizer, prompts, batch_size, max_new_tokens):
    from alignshield.evaluate.generate import generate_batch

    t0 = time.perf_counter()
    gen = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         add_special_tokens=True, progress=False)
    return gen, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 prompts, 16 new tokens (< 60 s)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama built in code instead of the embedded model")
    ap.add_argument("--prompts", type=int, default=None, help="harmful prompts (default 64; 32 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 48 (the preset's); 16 with --quick")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sequential-prompts", type=int, default=None,
                    help="prompts answered one by one (default: all; 6 with --quick)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="override the model dtype (default: the preset's, bfloat16; float32 for --tiny)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    n = args.prompts or (32 if args.quick else 64)
    max_new = args.max_new_tokens or (16 if args.quick else 48)
    n_seq = min(args.sequential_prompts or (6 if args.quick else n), n)

    import torch

    torch.set_num_threads(args.threads)
    from alignshield.config import load_config
    from alignshield.data.pools import load_pool
    from alignshield.data.templates import render_prompt
    from alignshield.models.load import load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = []
        if not args.tiny:
            try:
                from alignshield.models.load import embedded_checkpoint

                embedded_checkpoint()
            except Exception as why:  # the model package is missing
                print(f"note: the embedded model is unavailable ({why}); falling back to --tiny", file=sys.stderr)
                args.tiny = True
        if args.tiny:
            overrides += [f"model.name={_tiny_model_dir(Path(tmp))}", "model.dtype=float32"]
        if args.dtype:
            overrides.append(f"model.dtype={args.dtype}")
        cfg = load_config(overrides=overrides + [f"evaluate.harmful.stop={n}"])
        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
        load_seconds = time.perf_counter() - t0
        pool = load_pool(cfg.evaluate.harmful)
        prompts = [render_prompt(e, cfg.template, tokenizer) for e in pool]

        _timed(model, tokenizer, prompts[:2], 2, 4)  # warm-up: kernels, caches, lazy imports
        batched, batched_s = _timed(model, tokenizer, prompts, args.batch_size, max_new)
        sequential, sequential_s = _timed(model, tokenizer, prompts[:n_seq], 1, max_new)

    b_tokens, s_tokens = sum(batched.new_tokens), sum(sequential.new_tokens)
    b_rate, s_rate = b_tokens / batched_s, s_tokens / sequential_s
    identical = sum(a == b for a, b in zip(batched.answers, sequential.answers)) / n_seq
    speed = b_rate / s_rate
    print(f"model: {'tiny Llama (4 layers, hidden 32)' if args.tiny else 'embedded SmolLM2-135M-Instruct'}, "
          f"{cfg.model.dtype}, {torch.get_num_threads()} thread(s); {len(prompts)} prompts "
          f"({cfg.evaluate.harmful.dataset}), greedy, {max_new} new tokens max")
    print(f"batched (batch {args.batch_size}): {b_tokens} tokens in {batched_s:.2f} s = {b_rate:.1f} tokens/s")
    print(f"sequential (batch 1, {n_seq} prompts): {s_tokens} tokens in {sequential_s:.2f} s = {s_rate:.1f} tokens/s")
    print(f"speed-up {speed:.2f}x (goal >= {GOAL:.0f}x); answers identical: {identical:.1%}")
    print(json.dumps({
        "batched_over_sequential_speed": round(speed, 3), "goal": GOAL, "meets_goal": speed >= GOAL,
        "batched_tokens_per_second": round(b_rate, 2), "sequential_tokens_per_second": round(s_rate, 2),
        "batched_seconds": round(batched_s, 3), "sequential_seconds": round(sequential_s, 3),
        "batched_tokens": b_tokens, "sequential_tokens": s_tokens, "answers_identical": round(identical, 4),
        "prompts": len(prompts), "sequential_prompts": n_seq, "max_new_tokens": max_new, "batch_size": args.batch_size,
        "model": "tiny" if args.tiny else "embedded", "dtype": cfg.model.dtype, "threads": torch.get_num_threads(),
        "load_seconds": round(load_seconds, 2), "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
