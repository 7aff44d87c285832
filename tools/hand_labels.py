#!/usr/bin/env python
"""Hand labels for a sweep's answers: blind chunks to label, then the labelled harmful score per group.

    python tools/hand_labels.py chunks --runs RUN_DIR --sweep NAME --seeds 42 --tag a --out DIR
    python tools/hand_labels.py analyse --runs RUN_DIR --labels LABELS.jsonl [--compare align.method]

``chunks`` takes the same seeded draw of ``--prompts`` evaluation prompts (default 150 of them) from every
finished run of the sweep with one of ``--seeds`` (and the ``--where FIELD=VALUE`` values), mixes the runs' answers, shuffles them and writes
``chunk_<tag><k>.jsonl`` files of (id, prompt, answer) rows to label by hand, following
docs/judge-rubric.md, plus a ``key_<tag>.jsonl`` that maps each id back to its run. The labeller sees
no run, method or judge verdict.

``analyse`` reads a labels file (one row per answer: the key's fields plus label, kind, reason), groups
the answers by the ``--compare`` field of their runs and prints, per group, the hand-labelled harmful
share with its 95 % Wilson interval, the borderline share, and each judge's flag rate, Cohen's kappa,
precision and recall against the hand labels (borderline rows left out, as in
benchmarks/judge_quality.py). For two groups it prints their paired difference over the (seed, prompt)
units both have (``alignshield.stats.paired_comparison``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from alignshield.evaluate.agreement import cohen_kappa  # noqa: E402
from alignshield.experiments.report import field_value, select  # noqa: E402
from alignshield.experiments.store import ResultStore  # noqa: E402
from alignshield.stats import interval_text, paired_comparison  # noqa: E402

def _harmful_samples(runs: Path, key: str) -> list[dict]:
    rows = [json.loads(line) for line in (runs / "evaluate" / key / "samples.jsonl").open(encoding="utf-8")]
    return [r for r in rows if r["kind"] == "harmful"]


def _runs(runs: Path, sweep: str | None, superseded: bool = False) -> dict[str, object]:
    """{run key (its evaluation folder's name): stored run} of the sweep (every run without ``--sweep``;
    with ``superseded``, earlier evaluations of the same config too)."""
    with ResultStore.in_dir(runs, readonly=True) as store:
        return {r.run_key: r for r in store.runs(sweep, superseded=superseded)}


def chunks(args: argparse.Namespace) -> None:
    seeds = {int(s) for s in args.seeds.split(",")}
    runs = select(list(_runs(args.runs, args.sweep).values()), args.where)  # as `alignshield results --where`
    selected = {run.run_key: run for run in sorted(runs, key=lambda r: r.run_key) if run.seed in seeds}
    if not selected:
        sys.exit("no finished run matches --seeds and --where")
    harmful = {key: _harmful_samples(args.runs, key) for key in selected}
    counts = {len(h) for h in harmful.values()}
    if len(counts) != 1:
        sys.exit(f"the runs answered different numbers of harmful prompts ({sorted(counts)}): draw from one evaluation set")
    n = counts.pop()
    if args.prompts > n:
        sys.exit(f"--prompts {args.prompts} > the {n} harmful prompts each run answered")
    picked = sorted(random.Random(args.draw_seed).sample(range(n), args.prompts))  # n = 710: the headline's draw
    rows = []
    for key, run in selected.items():
        rows += [{"run": key, "seed": run.seed, "prompt_index": i, "prompt": harmful[key][i]["prompt"],
                  "answer": harmful[key][i]["answer"]} for i in picked]
    random.Random(f"{args.tag}-shuffle").shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for j, r in enumerate(rows):
        r["id"] = f"{args.tag}{j:04d}"
    _write(args.out / f"key_{args.tag}.jsonl", [{k: r[k] for k in ("id", "run", "seed", "prompt_index")} for r in rows])
    size = -(-len(rows) // args.chunks)
    for c in range(args.chunks):
        part = [{k: r[k] for k in ("id", "prompt", "answer")} for r in rows[c * size:(c + 1) * size]]
        _write(args.out / f"chunk_{args.tag}{c}.jsonl", part)
        print(args.out / f"chunk_{args.tag}{c}.jsonl", len(part))


def current_runs(runs: Path, sweep: str | None) -> tuple[dict[str, object], dict[str, str]]:
    """The sweep's runs, and for every stored run key (an earlier evaluation too, e.g. by a judge since
    retrained) the key of the sweep's run that judged the same answers (the same ``generate/`` folder)."""
    from alignshield.config import RunConfig
    from alignshield.stages import answers_dir

    def answers(run) -> Path:
        return answers_dir(RunConfig.model_validate(run.config))

    current = _runs(runs, sweep)
    by_answers = {answers(r): key for key, r in current.items()}
    latest = {key: by_answers[answers(r)] for key, r in _runs(runs, None, superseded=True).items()
              if answers(r) in by_answers}
    return current, latest | {key: key for key in current}


def analyse(args: argparse.Namespace) -> None:
    runs, latest = current_runs(args.runs, args.sweep)
    labels = [json.loads(line) for line in args.labels.open(encoding="utf-8")]
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    samples: dict[str, list[dict]] = {}
    for row in labels:
        key = latest[row["run"]]  # the labels name the run they were drawn from; judge with today's verdicts
        if key not in samples:
            samples[key] = _harmful_samples(args.runs, key)
        group = str(field_value(runs[key], args.compare))
        groups[group].append((row, samples[key][row["prompt_index"]]))
    summary: dict[str, dict] = {}
    for group, rows in sorted(groups.items()):
        n = len(rows)
        hand = [r["label"] for r, _ in rows]
        harmful = sum(label == "harmful" for label in hand)
        out = {"answers": n, "seeds": sorted({r["seed"] for r, _ in rows}), "hand_harmful": round(100 * harmful / n, 2),
               "hand_borderline": round(100 * sum(label == "borderline" for label in hand) / n, 2)}
        line = f"{args.compare}={group}: {n} answers, hand-labelled harmful {interval_text(100 * harmful / n, n)}, " \
               f"borderline {out['hand_borderline']:.1f}"
        for judge in sorted({j for _, s in rows for j in s["verdicts"]}):
            flags = [s["verdicts"][judge]["flagged"] for _, s in rows]
            kept = [(label == "harmful", f) for label, f in zip(hand, flags) if label != "borderline"]
            tp = sum(a and b for a, b in kept)
            predicted, actual = sum(b for _, b in kept), sum(a for a, _ in kept)
            out[judge] = {"flagged": round(100 * sum(flags) / n, 2), "kappa": _round(cohen_kappa(*zip(*kept))),
                          "precision": _round(tp / predicted if predicted else None),
                          "recall": _round(tp / actual if actual else None)}
            line += f" | {judge}: flags {out[judge]['flagged']:.1f} %, kappa {out[judge]['kappa']}"
        print(line)
        summary[group] = out
    if len(groups) == 2:
        a, b = sorted(groups)
        units = {g: defaultdict(dict) for g in (a, b)}
        for g in (a, b):
            for r, _ in groups[g]:
                units[g][r["seed"]][r["prompt_index"]] = r["label"] == "harmful"
        paired = paired_comparison(units[b], units[a])
        print(f"hand-labelled harmful, {b} - {a} = {paired.diff:+.2f} [{paired.low:+.2f}, {paired.high:+.2f}] points, "
              f"p = {paired.p:.3f} ({paired.seeds} seeds x {paired.prompts} prompts)")
        summary["difference"] = {"of": f"{b} - {a}", **vars(paired)}
    print(json.dumps(summary))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chunks", help="blind chunks of a sweep's answers to label by hand")
    c.add_argument("--runs", type=Path, required=True, help="the sweep's output_dir")
    c.add_argument("--sweep", default=None)
    c.add_argument("--seeds", required=True, help="comma-separated run seeds")
    c.add_argument("--tag", required=True, help="id prefix of this batch of chunks")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--prompts", type=int, default=150, help="evaluation prompts drawn (the same in every run)")
    c.add_argument("--draw-seed", type=int, default=20261202)
    c.add_argument("--chunks", type=int, default=3)
    c.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="only runs whose config field has this value (e.g. repair.method=none); repeatable, a field "
                        "given twice matches either value")
    a = sub.add_parser("analyse", help="hand-labelled harmful score per group, judges against the labels")
    a.add_argument("--runs", type=Path, required=True)
    a.add_argument("--sweep", default=None)
    a.add_argument("--labels", type=Path, required=True)
    a.add_argument("--compare", default="align.method", help="the run field whose values form the groups")
    args = ap.parse_args(argv)
    (chunks if args.command == "chunks" else analyse)(args)


if __name__ == "__main__":
    main()
