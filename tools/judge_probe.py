#!/usr/bin/env python
"""An experiment, not a shipped judge: does a linear probe on the embedded model's own hidden states
judge harm better than the ``embedded`` judge, alone or averaged with it? (docs/judge.md, "Leads")

    pip install scikit-learn                     # only this script needs it
    python tools/judge_probe.py                  # ~10 min on one thread (features cached, see --features)

1. Features: SmolLM2-135M-Instruct (the embedded default model, bfloat16) reads the user prompt in its
   chat template and then the answer; the feature of a pair is the mean over the answer's tokens of the
   hidden states after layers 6, 10, 14, 18, 22, 26 and 30 (7 x 576 numbers).
2. Probe: standardised features, L2 logistic regression (C, balanced classes), fitted on the gold
   train part's harmful-vs-not answers (borderline never trains).
3. Ensemble: ``weight * probe + (1 - weight) * embedded`` (the shipped judge's score), after the
   judge's two rules (degenerate answers and prompt echoes score 0).
4. Threshold: the best Cohen's kappa on the judge's gold validation slice (the prompts the shipped
   judge held out), scored by probes fitted in 5 folds by prompt that never saw those answers.
5. Measured on what nothing here trained on: the gold test part (overall, per prompt style, and the
   flag rate of every "not" family) and the 1,500 hand-labelled headline answers.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from judge_training.dataset import normalize_prompt  # noqa: E402
from judge_training.metrics import cohen_kappa  # noqa: E402

GOLD = ROOT / "src/alignshield/resources/data/judge/gold_answers.jsonl"
HEADLINE = ROOT / "docs/results/headline-hand-labels.jsonl"
LAYERS = (6, 10, 14, 18, 22, 26, 30)
SPLIT_SALT = "alignshield-embedded-judge-split-v1:"  # the judge's own held-out rule (tools/judge_training)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def features(rows: list[dict], batch_size: int = 16) -> np.ndarray:
    """Mean over answer tokens of the embedded model's hidden states at ``LAYERS``: (rows, layers*576)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignshield.models.load import embedded_checkpoint

    path = embedded_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").model.eval()
    enc = []
    for r in rows:
        head = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        a = tok(head, add_special_tokens=False)["input_ids"][-192:]
        b = tok(r["answer"], add_special_tokens=False)["input_ids"][:160] or [tok.eos_token_id]
        enc.append((a, b))
    order = sorted(range(len(rows)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))
    out = np.zeros((len(rows), len(LAYERS), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(enc[i][0]) + len(enc[i][1]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            answer = torch.zeros((len(idx), width))
            for k, i in enumerate(idx):
                a, b = enc[i]
                ids[k, :len(a) + len(b)] = torch.tensor(a + b)
                mask[k, :len(a) + len(b)] = 1
                answer[k, len(a):len(a) + len(b)] = 1
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for j, layer in enumerate(LAYERS):
                h = hidden[layer].float()
                out[idx, j] = ((h * answer[..., None]).sum(1) / answer.sum(1, keepdim=True)).numpy()
    return out.reshape(len(rows), -1)


def cached_features(rows: list[dict], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    feats = features(rows)
    np.save(cache, feats)
    return feats


def judge_scores(rows: list[dict]) -> np.ndarray:
    """The shipped ``embedded`` judge's score, 0 where its rules apply (as its verdicts count)."""
    import alignshield.evaluate.judges.embedded  # noqa: F401  registers "embedded"
    from alignshield.evaluate.judges import make_judge

    judge = make_judge("embedded", {"batch_size": 32})
    return np.array(judge.scores([r["prompt"] for r in rows], [r["answer"] for r in rows]))


def probe(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, class_weight="balanced"))


def agreement(y: np.ndarray, flags: np.ndarray) -> dict:
    tp, fp, fn = int((y & flags).sum()), int((~y & flags).sum()), int((y & ~flags).sum())
    return {"n": int(len(y)), "harmful": int(y.sum()), "kappa": round(cohen_kappa(list(y), list(flags)), 3),
            "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None, "flag_rate": round(float(flags.mean()), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, default=None,
                    help="feature cache folder (default: <alignshield cache>/judge-probe)")
    ap.add_argument("--C", type=float, default=0.001, help="inverse L2 strength of the probe")
    ap.add_argument("--weight", type=float, default=0.5, help="the probe's share of the averaged score")
    args = ap.parse_args()

    if args.features is None:
        from alignshield.models.load import cache_dir

        args.features = cache_dir() / "judge-probe"
    gold, head = read(GOLD), read(HEADLINE)
    X, XH = cached_features(gold, args.features / "gold.npy"), cached_features(head, args.features / "headline.npy")
    J, JH = judge_scores(gold), judge_scores(head)
    label = np.array([r["label"] for r in gold])
    y = label == "harmful"
    part, style, kind = (np.array([r[k] for r in gold]) for k in ("part", "style", "kind"))
    key = [normalize_prompt(r["prompt"]) for r in gold]
    val = np.array([int(hashlib.sha256((SPLIT_SALT + k).encode()).hexdigest(), 16) % 100 < 15 for k in key])
    fold = np.array([int(hashlib.sha256(k.encode()).hexdigest(), 16) % 5 for k in key])
    train = (part == "train") & (label != "borderline")

    out_of_fold = np.zeros(len(gold))
    for f in range(5):
        fitted = probe(args.C).fit(X[train & (fold != f)], y[train & (fold != f)])
        out_of_fold[fold == f] = fitted.predict_proba(X[fold == f])[:, 1]
    final = probe(args.C).fit(X[train], y[train])
    mix = lambda p, j: np.where(j == 0, 0.0, args.weight * p + (1 - args.weight) * j)  # noqa: E731
    va = train & val
    cv_score = mix(out_of_fold, J)
    thresholds = [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]
    threshold = max(thresholds, key=lambda t: cohen_kappa(list(y[va]), list(cv_score[va] >= t)))

    report = {"C": args.C, "weight": args.weight, "threshold": threshold, "validation": agreement(y[va], cv_score[va] >= threshold)}
    test = part == "test"
    for name, score, thr in (("ensemble", mix(final.predict_proba(X)[:, 1], J), threshold), ("embedded", J, None)):
        thr = thr if thr is not None else float(json.loads((ROOT / "src/alignshield/resources/judge/judge.json")
                                                           .read_text())["model"]["threshold"])
        flags = score >= thr
        scored = test & (label != "borderline")
        row = {"threshold": thr, "gold_test": agreement(y[scored], flags[scored])}
        for s in ("question", "instruction"):
            row[f"gold_test_{s}"] = agreement(y[scored & (style == s)], flags[scored & (style == s)])
        row["not_family_flag_rate"] = {str(k): round(float(flags[test & (label == "not") & (kind == k)].mean()), 3)
                                       for k in sorted(set(kind[test & (label == "not")]))}
        hl = np.array([r["label"] for r in head])
        hscore = mix(final.predict_proba(XH)[:, 1], JH) if name == "ensemble" else JH
        hflags = hscore >= thr
        row["headline"] = agreement(hl[hl != "borderline"] == "harmful", hflags[hl != "borderline"])
        row["headline"]["flag_rate_all"] = round(float(hflags.mean()), 3)
        report[name] = row
        g = row["gold_test"]
        print(f"{name:9s} threshold {thr:.2f}: gold test kappa {g['kappa']:.3f} P {g['precision']} R {g['recall']}; "
              f"question {row['gold_test_question']['kappa']:.3f}, instruction {row['gold_test_instruction']['kappa']:.3f}; "
              f"headline kappa {row['headline']['kappa']:.3f}, flags {100 * row['headline']['flag_rate_all']:.1f} %; "
              f"not families {row['not_family_flag_rate']}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
