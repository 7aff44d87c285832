"""The user's fine-tuning set: n task samples of which round(p * n) are replaced by harmful pairs."""

from __future__ import annotations

import math
import random

from alignshield.data.jsonl import DataError
from alignshield.data.pools import Example
from alignshield.seeding import derive_seed


def harmful_count(n: int, p: float) -> int:
    """round(p * n) with halves rounded up (Python's round() would round 0.5 to even)."""
    return int(math.floor(p * n + 0.5))


def sample(pool: list[Example], k: int, rng: random.Random, with_replacement: bool, what: str) -> list[Example]:
    if k > len(pool) and not with_replacement:
        raise DataError(
            f"{what}: asked for {k} samples but the pool holds {len(pool)}; "
            "shrink n, enlarge the pool, or set with_replacement=true"
        )
    return rng.choices(pool, k=k) if with_replacement and k > len(pool) else rng.sample(pool, k)


def build_mix(
    benign: list[Example], harmful: list[Example], n: int, p: float, seed: int, with_replacement: bool = False
) -> list[tuple[Example, bool]]:
    """Exactly n (example, is_harmful) pairs, round(p * n) harmful, shuffled; the same for the same seed."""
    if not 0.0 <= p <= 1.0:
        raise DataError(f"p must lie in [0, 1], got {p}")
    if n <= 0:
        raise DataError(f"n must be positive, got {n}")
    n_harmful = harmful_count(n, p)
    rng = random.Random(derive_seed(seed, "finetune-mix"))
    mix = [(e, False) for e in sample(benign, n - n_harmful, rng, with_replacement, "fine-tune task pool")]
    mix += [(e, True) for e in sample(harmful, n_harmful, rng, with_replacement, "harmful pool")]
    rng.shuffle(mix)
    return mix
