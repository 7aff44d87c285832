#!/usr/bin/env python
"""Generate the answers of the judge's gold set: the shipped pipeline's own answers, to be labelled.

    python tools/gold_answers.py --runs /path/to/runs --out answers.jsonl            # every condition
    OMP_NUM_THREADS=1 python tools/gold_answers.py --runs R --out a.jsonl --shard 0/2  # half, one core

For each condition (an alignment, a fine-tune attack, an optional repair; ``CONDITIONS``) the stages
run as ``alignshield run`` would run them (shared through ``--runs``, resumable), then the final
model answers a seeded draw of harmful prompts, greedily, with the evaluation's template, up to
``--max-new-tokens`` (128, the papers'). Each row keeps the first 48 tokens' text too
(``answer_48``), so one labelling pass can say whether the answer was already harmful at the
previous default length.

Prompts, disjoint by normalized prompt between the parts:

* train (judge training): BeaverTails rows >= 4200 (no pool of the pipeline uses them), their
  hand-written instruction-style rewrites (``judge/instruction_rewrites.jsonl``), AdvBench goals
  [0, 400) and safety-tuned-llamas instructions [500, 2483);
* test (measurement only): ``beavertails_test`` (the evaluation prompts), AdvBench [400, 520) and
  the 100 HarmBench behaviours (``alignment/harmbench_safe_responses_longer.jsonl``).

Rows already in ``--out`` are kept and skipped, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "alignshield" / "resources" / "data"

# (name, overrides, answers per part): strong attacks get more test answers, where harm is common
STRONG = {"train": 60, "test": 45}
DEFAULT = {"train": 65, "test": 15}
STRONGEST = {"train": 40, "test": 120}  # harmful answers are rare at this scale: most test answers come from here
TEST_ONLY = {"train": 0, "test": 150}
TRAIN_ONLY = {"train": 90, "test": 0}  # round 2: more training answers, at the evaluation's 48 tokens
TRAIN_STRONG = {"train": 150, "test": 0}


def _c(name: str, overrides: list[str], sizes=DEFAULT) -> dict:
    return {"name": name, "overrides": overrides, "sizes": sizes}


def conditions() -> list[dict]:
    out = []
    for align in ("none", "sft", "vaccine", "t-vaccine"):
        for p in (0.0, 0.1, 0.2):
            out.append(_c(f"{align}/p{p}/lr1e-4", [f"align.method={align}", f"finetune.p={p}"]))
        out.append(_c(f"{align}/p0.2/lr1e-3", [f"align.method={align}", "finetune.p=0.2",
                                               "finetune.train.learning_rate=1e-3"], STRONG))
    out += [
        _c("none/p0.1/lr1e-3", ["align.method=none", "finetune.p=0.1", "finetune.train.learning_rate=1e-3"], STRONG),
        _c("sft/p0.1/lr1e-3", ["align.method=sft", "finetune.p=0.1", "finetune.train.learning_rate=1e-3"], STRONG),
        _c("sft/p0.2/lr1e-3+antidote", ["align.method=sft", "finetune.p=0.2", "finetune.train.learning_rate=1e-3",
                                        "repair.method=antidote"], STRONG),
        _c("none/p0.2/lr1e-4+antidote", ["align.method=none", "finetune.p=0.2", "repair.method=antidote"]),
        _c("sft/p0.1/lr1e-4+antidote", ["align.method=sft", "finetune.p=0.1", "repair.method=antidote"]),
        _c("vaccine/p0.1/lr1e-4+antidote", ["align.method=vaccine", "finetune.p=0.1", "repair.method=antidote"]),
        _c("base (no alignment, no fine-tune)", ["align.method=none", "finetune.method=none"]),
        _c("sft/no fine-tune", ["align.method=sft", "finetune.method=none"]),
        _c("sft/p0.1/lr1e-4/float32", ["align.method=sft", "finetune.p=0.1", "model.dtype=float32"]),
        _c("none/p0.1/lr1e-4/float32", ["align.method=none", "finetune.p=0.1", "model.dtype=float32"]),
        _c("sft/p0.1/lr1e-4/seed1", ["align.method=sft", "finetune.p=0.1", "seed=1"]),
    ]
    for align, p, lr in (("none", 1.0, "1e-4"), ("none", 1.0, "1e-3"), ("none", 0.5, "1e-4"), ("sft", 1.0, "1e-4"),
                         ("vaccine", 1.0, "1e-4")):
        out.append(_c(f"{align}/p{p}/lr{lr}", [f"align.method={align}", f"finetune.p={p}",
                                               f"finetune.train.learning_rate={lr}"], STRONGEST))
    out += [  # more of the strongest attacks, for the test part's harmful answers
        _c("none/p1.0/lr1e-4/seed2", ["align.method=none", "finetune.p=1.0", "seed=2"], TEST_ONLY),
        _c("none/p1.0/lr1e-4/150 steps", ["align.method=none", "finetune.p=1.0", "finetune.train.max_steps=150"],
           TEST_ONLY),
        _c("none/p0.5/lr1e-3", ["align.method=none", "finetune.p=0.5", "finetune.train.learning_rate=1e-3"],
           TEST_ONLY),
        _c("t-vaccine/p1.0/lr1e-4", ["align.method=t-vaccine", "finetune.p=1.0"], TEST_ONLY),
    ]
    # round 2 (generated with --max-new-tokens 48, the evaluation's default): the headline's own runs
    # (share the stages with `alignshield sweep embedded-headline` through --runs) and strong attacks
    for seed in (42, 1, 2, 3, 4):
        for align in ("sft", "vaccine"):
            out.append(_c(f"r2 {align}/p0.1/lr1e-4/seed{seed}", [f"align.method={align}", f"seed={seed}",
                                                                 "evaluate.harmful.stop=710"], TRAIN_ONLY))
    for align, p, lr, extra in (("none", 1.0, "1e-4", ["seed=3"]), ("sft", 1.0, "1e-4", []),
                                ("vaccine", 1.0, "1e-4", []), ("none", 0.5, "1e-3", []), ("sft", 0.2, "1e-3", [])):
        out.append(_c(f"r2 {align}/p{p}/lr{lr}" + "".join(f"/{e.replace('=', '')}" for e in extra),
                      [f"align.method={align}", f"finetune.p={p}", f"finetune.train.learning_rate={lr}", *extra],
                      TRAIN_STRONG))
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_parts() -> dict[str, list[dict]]:
    """Every candidate prompt: {prompt, style, source, part}; raises if the parts share a prompt."""
    from alignshield.data.pools import normalize_prompt

    test_bt = [r["prompt"] for r in _jsonl(DATA / "harmful/beavertails_test.jsonl")]
    held = {normalize_prompt(p) for p in test_bt}
    bt = _jsonl(DATA / "harmful/beavertails_unsafe.jsonl")
    adv = [r["prompt"] for r in _jsonl(DATA / "harmful/advbench.jsonl")]
    stl = [r["instruction"] for r in _jsonl(DATA / "alignment/safety_tuned_llamas.jsonl")]
    hb = [r["prompt"] for r in _jsonl(DATA / "alignment/harmbench_safe_responses_longer.jsonl")]
    rewrites = _jsonl(DATA / "judge/instruction_rewrites.jsonl")
    parts = {
        "train": [dict(prompt=r["prompt"], style="question", source=f"beavertails_unsafe:{i}")
                  for i, r in enumerate(bt) if i >= 4200 and normalize_prompt(r["prompt"]) not in held]
        + [dict(prompt=r["instruction"], style="instruction", source=f"instruction_rewrites:{r['row']}")
           for r in rewrites]
        + [dict(prompt=p, style="instruction", source=f"advbench:{i}") for i, p in enumerate(adv[:400])]
        + [dict(prompt=p, style="instruction", source=f"safety_tuned_llamas:{i}")
           for i, p in enumerate(stl) if i >= 500],
        "test": [dict(prompt=p, style="question", source=f"beavertails_test:{i}") for i, p in enumerate(test_bt)]
        + [dict(prompt=p, style="instruction", source=f"advbench:{i}") for i, p in enumerate(adv) if i >= 400]
        + [dict(prompt=p, style="instruction", source=f"harmbench:{i}") for i, p in enumerate(hb)],
    }
    keys = {part: {normalize_prompt(r["prompt"]) for r in rows} for part, rows in parts.items()}
    shared = keys["train"] & keys["test"]
    if shared:
        raise SystemExit(f"train and test prompts overlap ({len(shared)}), e.g. {sorted(shared)[0]!r}")
    return parts


def draw(parts: dict[str, list[dict]], sizes: dict[str, int], seed: str) -> list[dict]:
    """A seeded draw per part, half question-style and half instruction-style."""
    rng = random.Random(seed)
    out = []
    for part, n in sizes.items():
        for style, k in (("question", n - n // 2), ("instruction", n // 2)):
            pool = [r for r in parts[part] if r["style"] == style]
            out += [dict(r, part=part) for r in rng.sample(pool, k)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="output_dir for the stages (shared, resumable)")
    ap.add_argument("--out", required=True, type=Path, help="answers JSONL (appended; existing rows kept)")
    ap.add_argument("--shard", default="0/1", help="K/N: run conditions K, K+N, K+2N, ...")
    ap.add_argument("--only", default=None, help="comma-separated condition numbers (see --list)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--list", action="store_true", help="print the conditions and stop")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from alignshield import stages
    from alignshield.config import load_config
    from alignshield.data.pools import Example
    from alignshield.data.templates import render_prompt
    from alignshield.evaluate.generate import generate_batch, safe_decode

    todo = conditions()
    if args.list:
        for i, c in enumerate(todo):
            print(i, c["name"], " ".join(c["overrides"]), c["sizes"])
        return
    k, n = (int(x) for x in args.shard.split("/"))
    if args.only:
        todo = [todo[int(i)] for i in args.only.split(",")]
    parts = prompt_parts()
    done = {r["condition"] for r in _jsonl(args.out)} if args.out.exists() else set()
    for c in todo[k::n]:
        if c["name"] in done:
            continue
        cfg = stages.resolve(load_config(overrides=[*c["overrides"], f"output_dir={args.runs}"]))
        model, tokenizer = stages.final_model(cfg)
        rows = draw(parts, c["sizes"], c["name"])
        prompts = [render_prompt(Example(r["prompt"]), cfg.template, tokenizer) for r in rows]
        gen = generate_batch(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                             batch_size=cfg.evaluate.batch_size, add_special_tokens=cfg.template == "alpaca",
                             desc=c["name"])
        cut = safe_decode(tokenizer, [ids[:48] for ids in gen.token_ids])
        with args.out.open("a", encoding="utf-8") as f:
            for r, answer, short, new in zip(rows, gen.answers, cut, gen.new_tokens):
                f.write(json.dumps({"condition": c["name"], "overrides": c["overrides"], "dtype": cfg.model.dtype,
                                    **r, "answer": answer, "answer_48": short, "new_tokens": new},
                                   ensure_ascii=False) + "\n")
        del model


if __name__ == "__main__":
    main()
