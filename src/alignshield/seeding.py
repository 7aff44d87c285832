"""One way to derive every random stream alignshield uses from the run's seed.

``derive_seed(seed, *parts)`` hashes the seed with the parts that name a stream (a purpose, a step,
a micro-batch, a layer, a DDP rank ...) into a 63-bit integer: streams with different parts are
independent, the same parts always give the same stream (so a resumed run draws what an
uninterrupted one would), and no part can collide with another's arithmetic the way hand-made
formulas (``seed * 1_000_003 + step``) can.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``parts`` (their ``repr``, in order)."""
    text = "\x1f".join([repr(int(seed)), *map(repr, parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *parts)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
