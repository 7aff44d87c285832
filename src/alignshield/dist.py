"""Everything distributed, in one place, on accelerate's ``PartialState``.

Under ``torchrun`` / ``accelerate launch`` every process runs the same code: training is
data-parallel (``train.Trainer``), the evaluation's generation is sharded (``shard_bounds``,
``gather_lists``), the repair and the judges run redundantly on every rank, and rank 0 alone writes
files and the results database. In a single process (``WORLD_SIZE`` unset or 1) none
of this initialises anything: every helper answers at once.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, ContextManager


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def state():
    """The process group's ``PartialState``, on the same device choice as ``train.Trainer``'s Accelerator."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return not is_distributed() or state().is_main_process


def main_process_first() -> ContextManager:
    """Rank 0 runs the block first, the others after it (one-time work such as a cache conversion)."""
    return state().main_process_first() if is_distributed() else nullcontext()


def barrier() -> None:
    if is_distributed():
        state().wait_for_everyone()


def broadcast(value: Any) -> Any:
    """Rank 0's value, on every rank (picklable values)."""
    if not is_distributed():
        return value
    from accelerate.utils import broadcast_object_list

    state()
    return broadcast_object_list([value], from_process=0)[0]


def shard_bounds(n: int) -> tuple[int, int]:
    """This rank's contiguous ``[lo, hi)`` of ``n`` items; the first ``n % world`` ranks take one more."""
    if not is_distributed():
        return 0, n
    world, rank = world_size(), state().process_index
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


def gather_lists(local: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (one process: ``local``)."""
    if not is_distributed():
        return local
    from accelerate.utils import gather_object

    state()
    return gather_object(local)
