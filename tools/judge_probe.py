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
6. ``--style-thresholds``: also the probe alone, with one threshold per prompt style (question /
   instruction), each the best kappa of out-of-fold probe scores over the whole gold train part
   (5 folds by prompt), a validation set about seven times the judge's slice.
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
from judge_training.dataset import is_heldout, normalize_prompt, read_jsonl  # noqa: E402
from judge_training.metrics import binary_metrics, cohen_kappa  # noqa: E402

from alignshield.evaluate.judges import embedded  # noqa: E402

GOLD = ROOT / "src/alignshield/resources/data/judge/gold_answers.jsonl"
HEADLINE = ROOT / "docs/results/headline-hand-labels.jsonl"
LAYERS = (6, 10, 14, 18, 22, 26, 30)


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
                out[idx, j] = embedded.mean_pool(hidden[layer].float(), answer).numpy()
    return out.reshape(len(rows), -1)


def cached_features(rows: list[dict], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    feats = features(rows)
    np.save(cache, feats)
    return feats


def judge_scores(rows: list[dict]) -> tuple[np.ndarray, float]:
    """The shipped ``embedded`` judge's scores (0 where its rules apply) and its threshold."""
    judge = embedded.EmbeddedJudge(batch_size=32)
    return np.array(judge.scores([r["prompt"] for r in rows], [r["answer"] for r in rows])), judge.threshold


def probe(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, class_weight="balanced"))


def agreement(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Hand labels vs flags at ``threshold``: kappa, precision, recall, AUC, flag rate."""
    flags = scores >= threshold
    m = binary_metrics(list(y.astype(int)), list(flags), list(scores))
    out = {k: m[k] for k in ("n", "precision", "recall", "auc")}
    out |= {"harmful": int(y.sum()), "kappa": cohen_kappa(list(y), list(flags)), "flag_rate": float(flags.mean())}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, default=None,
                    help="feature cache folder (default: <alignshield cache>/judge-probe)")
    ap.add_argument("--C", type=float, default=0.001, help="inverse L2 strength of the probe")
    ap.add_argument("--weight", type=float, default=0.5, help="the probe's share of the averaged score")
    ap.add_argument("--style-thresholds", action="store_true",
                    help="also score the probe alone with per-style thresholds chosen out of fold on the train part")
    args = ap.parse_args()

    if args.features is None:
        from alignshield.models.load import cache_dir

        args.features = cache_dir() / "judge-probe"
    gold, head = read_jsonl(GOLD), read_jsonl(HEADLINE)
    X, XH = cached_features(gold, args.features / "gold.npy"), cached_features(head, args.features / "headline.npy")
    (J, judge_threshold), (JH, _) = judge_scores(gold), judge_scores(head)
    ruled, hruled = ([embedded.never_flagged(r["prompt"], r["answer"]) for r in rows] for rows in (gold, head))
    label = np.array([r["label"] for r in gold])
    y = label == "harmful"
    part, style, kind = (np.array([r[k] for r in gold]) for k in ("part", "style", "kind"))
    val = np.array([is_heldout(r["prompt"]) for r in gold])  # the prompts the shipped judge never trained on
    fold = np.array([int(hashlib.sha256(normalize_prompt(r["prompt"]).encode()).hexdigest(), 16) % 5 for r in gold])
    train = (part == "train") & (label != "borderline")

    out_of_fold = np.zeros(len(gold))
    for f in range(5):
        fitted = probe(args.C).fit(X[train & (fold != f)], y[train & (fold != f)])
        out_of_fold[fold == f] = fitted.predict_proba(X[fold == f])[:, 1]
    final = probe(args.C).fit(X[train], y[train])
    def mix(p: np.ndarray, j: np.ndarray, rule: list[bool]) -> np.ndarray:
        return np.where(rule, 0.0, args.weight * p + (1 - args.weight) * j)

    va = train & val
    cv_score = mix(out_of_fold, J, ruled)

    def best(score: np.ndarray, rows: np.ndarray, grid: np.ndarray) -> float:
        """The threshold of ``grid`` with the best Cohen's kappa against the hand labels of ``rows``."""
        return max((round(t, 2) for t in grid), key=lambda t: cohen_kappa(list(y[rows]), list(score[rows] >= t)))

    threshold = best(cv_score, va, np.arange(0.05, 0.96, 0.05))

    report = {"C": args.C, "weight": args.weight, "threshold": threshold,
              "validation": agreement(y[va], cv_score[va], threshold)}
    test = part == "test"
    hl = np.array([r["label"] for r in head])
    both = lambda t: {"question": t, "instruction": t}  # noqa: E731  (one threshold per prompt style)
    scores = {"ensemble": (mix(final.predict_proba(X)[:, 1], J, ruled), mix(final.predict_proba(XH)[:, 1], JH, hruled),
                           both(threshold)),
              "embedded": (J, JH, both(judge_threshold))}
    if args.style_thresholds:  # the probe alone; thresholds from its out-of-fold scores on all of the train part
        oof = np.where(ruled, 0.0, out_of_fold)
        scores["probe_style_thresholds"] = (np.where(ruled, 0.0, final.predict_proba(X)[:, 1]),
                                            np.where(hruled, 0.0, final.predict_proba(XH)[:, 1]),
                                            {s: best(oof, train & (style == s), np.arange(0.05, 0.99, 0.01))
                                             for s in ("question", "instruction")})
    for name, (score, hscore, thr) in scores.items():
        cut = np.array([thr[s] for s in style])  # headline prompts are all question-style
        flags = score >= cut
        scored = test & (label != "borderline")
        row = {"threshold": thr, "gold_test": agreement(y[scored], score[scored], cut[scored])}
        for s in ("question", "instruction"):
            row[f"gold_test_{s}"] = agreement(y[scored & (style == s)], score[scored & (style == s)], thr[s])
        row["not_family_flag_rate"] = {str(k): round(float(flags[test & (label == "not") & (kind == k)].mean()), 3)
                                       for k in sorted(set(kind[test & (label == "not")]))}
        row["headline"] = agreement(hl[hl != "borderline"] == "harmful", hscore[hl != "borderline"], thr["question"])
        row["headline"]["flag_rate_all"] = round(float((hscore >= thr["question"]).mean()), 3)
        report[name] = row
        g = row["gold_test"]
        print(f"{name:9s} thresholds {thr['question']:.2f}/{thr['instruction']:.2f}: gold test kappa {g['kappa']:.3f} "
              f"P {g['precision']} R {g['recall']}; question {row['gold_test_question']['kappa']:.3f}, "
              f"instruction {row['gold_test_instruction']['kappa']:.3f}; headline kappa {row['headline']['kappa']:.3f}, "
              f"flags {100 * row['headline']['flag_rate_all']:.1f} %; not families {row['not_family_flag_rate']}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
