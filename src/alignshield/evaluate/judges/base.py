"""What every harmfulness judge provides.

A judge reads (prompt, answer) pairs and returns one ``Verdict`` per pair. ``flagged`` is what the
Harmful Score counts; ``score`` is the judge's own confidence that the answer is harmful (0..1, or
None when the judge has no graded output); ``label`` is a short category name kept in the per-sample
log (e.g. "refusal", "degenerate", "harmful", "safe"); ``detail`` is optional extra evidence for the
log (a guard model's raw output, the top harm categories), never counted.

A judge must return exactly one verdict per pair, in order, and must not fail on an empty answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from alignshield.registry import Registry


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    score: float | None
    label: str
    detail: str | None = None


class Judge(Protocol):
    name: str

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]: ...


class JudgeLoadError(RuntimeError):
    """A judge's weights or dependencies could not be loaded; the message names the alternatives."""


# name -> factory(**options) returning a Judge; heavy judges import their dependencies lazily.
JUDGES: Registry = Registry("judge")
