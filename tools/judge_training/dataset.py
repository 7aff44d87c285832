"""The labelled dataset: the shipped sources, the split by prompt, each family's quota draws and the
checks that no evaluation prompt is used (``build_dataset``)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from alignshield.data.pools import normalize_prompt  # the one normaliser
from alignshield.evaluate.judges import embedded
from judge_training.candidates import candidate_examples
from judge_training.families import (
    DEFAULT_SEED, DIAGNOSTIC_FAMILIES, GOLD_FILE, HELDOUT_ADVBENCH_FROM, HELDOUT_QUOTA, TRAIN_QUOTA, Example,
    family_rng,
)

DATA_DIR = embedded.WEIGHTS_DIR.parent / "data"  # alignshield/resources/data
HELDOUT_PERCENT = 15
SPLIT_SALT = "alignshield-embedded-judge-split-v1"


class TestPromptLeakError(RuntimeError):
    """A judge training / held-out pair shares a prompt with harmful/beavertails_test.jsonl."""


@dataclass
class Dataset:
    train: list[Example]
    heldout: list[Example]  # labelled families only
    diagnostics: list[Example]  # unlabelled, held-out side
    stats: dict


def build_dataset(data_dir: Path = DATA_DIR, seed: int = DEFAULT_SEED,
                  train_quota: dict | None = None, heldout_quota: dict | None = None) -> Dataset:
    """Deterministic in (data files, seed); the held-out draw does not depend on train_quota."""
    quotas = {"train": dict(TRAIN_QUOTA if train_quota is None else train_quota),
              "heldout": dict(HELDOUT_QUOTA if heldout_quota is None else heldout_quota)}
    src = load_sources(Path(data_dir))
    test_norms = test_prompt_norms(src)
    train, heldout, diagnostics, stats = draw_splits(candidate_examples(src, seed), test_norms, seed, quotas)

    check_no_test_prompts(train, test_norms, "training")
    check_no_test_prompts(heldout + diagnostics, test_norms, "held-out")
    check_split_disjoint(train, heldout + diagnostics)
    family_rng(seed, "order", "train").shuffle(train)
    stats["train_total"] = {"n": len(train), "harmful": sum(e.label for e in train)}
    stats["heldout_total"] = {"n": len(heldout), "harmful": sum(e.label for e in heldout)}
    stats["test_prompts"] = len(test_norms)
    return Dataset(train, heldout, diagnostics, stats)


def draw_splits(cands: dict[str, list[Example]], test_norms: set[str], seed: int,
                quotas: dict[str, dict]) -> tuple[list[Example], list[Example], list[Example], dict]:
    """Per family: drop the pairs with a test prompt, split the rest by prompt (``is_heldout``) and
    draw each side's quota at random. Returns the train, held-out and diagnostic pairs and the counts."""
    train: list[Example] = []
    heldout: list[Example] = []
    diagnostics: list[Example] = []
    stats: dict = {"candidates": {}, "removed_test_prompt": {}, "train": {}, "heldout": {}}
    for fam, exs in cands.items():
        kept = [e for e in exs if normalize_prompt(e.prompt) not in test_norms]
        stats["candidates"][fam] = len(exs)
        stats["removed_test_prompt"][fam] = len(exs) - len(kept)
        for side in ("train", "heldout"):
            pool = [e for e in kept if is_heldout(e.prompt) == (side == "heldout")]
            picked = draw(pool, quotas[side].get(fam, 0), family_rng(seed, "pick", side, fam))
            stats[side][fam] = side_counts(picked, pool)
            if side == "train":
                train += picked
            elif fam in DIAGNOSTIC_FAMILIES:
                diagnostics += picked
            else:
                heldout += picked
    return train, heldout, diagnostics, stats


def draw(pool: list[Example], quota: int, rng: random.Random) -> list[Example]:
    """``quota`` pairs of ``pool`` drawn without replacement (all of them when fewer)."""
    n = min(quota, len(pool))
    return rng.sample(pool, n) if n else []


def side_counts(picked: list[Example], pool: list[Example]) -> dict:
    """How many were drawn, of how many, and per variant."""
    variants = {f"variant:{k}": v for k, v in sorted(Counter(e.variant for e in picked).items()) if k}
    return {"n": len(picked), "available": len(pool), **variants}


def is_heldout(prompt: str) -> bool:
    digest = hashlib.sha256(f"{SPLIT_SALT}:{normalize_prompt(prompt)}".encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; the judge is trained only on the data shipped in alignshield/resources/data"
        )
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_sources(data_dir: Path) -> dict[str, list[dict]]:
    files = {
        "bt": "harmful/beavertails_unsafe.jsonl",
        "bt_test": "harmful/beavertails_test.jsonl",
        "advbench": "harmful/advbench.jsonl",
        "stl": "alignment/safety_tuned_llamas.jsonl",
        "harmbench": "alignment/harmbench_safe_responses_longer.jsonl",
        "hh": "judge/hh_rlhf_harmless_test.jsonl",
        "alpaca": "benign/alpaca_1k.jsonl",
        "gsm8k": "benign/gsm8k_train.jsonl",
    }
    out = {key: read_jsonl(data_dir / rel) for key, rel in files.items()}
    gold = data_dir / GOLD_FILE
    out["gold"] = read_jsonl(gold) if gold.is_file() else []
    return out


def test_prompt_norms(src: dict[str, list[dict]]) -> set[str]:
    """Normalized prompts that must never train the judge: the evaluation prompts (beavertails_test),
    the gold test part's instruction pools (AdvBench [400, 520), the HarmBench behaviours) and every
    prompt of the gold test part."""
    prompts = [r["prompt"] for r in src["bt_test"]] + [r["prompt"] for r in src["harmbench"]]
    prompts += [r["prompt"] for r in src["advbench"][HELDOUT_ADVBENCH_FROM:]]
    prompts += [r["prompt"] for r in src["gold"] if r["part"] == "test"]
    return {normalize_prompt(p) for p in prompts}


def check_no_test_prompts(examples: Iterable[Example], test_norms: set[str], where: str) -> None:
    leaks = [ex.prompt for ex in examples if normalize_prompt(ex.prompt) in test_norms]
    if leaks:
        raise TestPromptLeakError(
            f"{len(leaks)} {where} pair(s) share a normalized prompt with the evaluation or gold test prompts, "
            f"e.g. {leaks[0][:80]!r}; the evaluation prompts must never be used to build the judge"
        )


def check_split_disjoint(train: Sequence[Example], heldout: Sequence[Example]) -> None:
    shared = {normalize_prompt(e.prompt) for e in train} & {normalize_prompt(e.prompt) for e in heldout}
    if shared:
        raise RuntimeError(f"{len(shared)} prompt(s) are in both the training and held-out split")
