"""Shared plumbing for the judges that run Hugging Face models (``beaverdam``, ``hf-classifier``,
``llamaguard`` and the guards): their common options (``HFParams``: checkpoint, revision, dtype, device,
batch size), quiet loading, load errors that name the alternatives. torch and transformers are imported
inside the functions, never at module import.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

from pydantic import Field

from alignshield.evaluate.judges.base import JudgeLoadError, JudgeParams

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class HFParams(JudgeParams):
    """Options every Hugging Face judge takes; each judge redeclares the defaults it differs in."""

    model: str
    """The checkpoint: a Hugging Face hub id or a local folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``model``; the default branch when unset."""
    dtype: Dtype = "float32"
    """Weights' dtype; ``auto``: the checkpoint's own."""
    device: str = "auto"
    """Torch device; ``auto``: CUDA when available, else the CPU."""
    batch_size: int = Field(16, ge=1)
    """Conversations per forward pass: speed and memory, not the verdicts."""
    trust_remote_code: bool = False
    """Let the checkpoint's own modelling code run (``from_pretrained(trust_remote_code=True)``)."""


def load_error(judge: str, model: str, cause: BaseException | str, hint: str = "") -> JudgeLoadError:
    """``JudgeLoadError`` naming the judge, what it tried to load, why it failed and what else there is."""
    from alignshield.evaluate.judges.base import JUDGES

    if isinstance(cause, BaseException):
        cause = f"{type(cause).__name__}: {cause}".strip()
    others = ", ".join(n for n in JUDGES.names() if n != judge)
    return JudgeLoadError(
        f"judge {judge!r} cannot load {model!r}: {cause}. "
        + (f"{hint} " if hint else "")
        + f"Other judges: {others} (keyword needs no weights)."
    )


def check_source(judge: str, model: str | None, hint: str = "") -> None:
    """Fail before any compute when a judge's ``model`` is a local path holding no checkpoint (or,
    offline, a hub id that is not cached); hub ids are otherwise checked when the judge loads."""
    from alignshield.models.load import ModelSourceError, check_model_source

    if model is None:
        return
    try:
        check_model_source(model, field=f"evaluate.judge_options.{judge}.model")
    except ModelSourceError as err:
        raise load_error(judge, model, str(err), hint) from None


def torch_dtype(dtype: Dtype):
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def torch_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while a judge loads (a checkpoint's
    classification head is *expected* to be unused by a bare backbone)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
