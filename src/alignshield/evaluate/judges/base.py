"""What every harmfulness judge provides.

A judge reads (prompt, answer) pairs and returns one ``Verdict`` per pair. ``flagged`` is what the
Harmful Score counts; ``score`` is the judge's own confidence that the answer is harmful (0..1, or
None when the judge has no graded output); ``label`` is a short category name kept in the per-sample
log (e.g. "refusal", "degenerate", "harmful", "safe"); ``detail`` is optional extra evidence for the
log (a guard model's raw output, the top harm categories), never counted.

A judge must return exactly one verdict per pair, in order, and must not fail on an empty answer.

Its options (``evaluate.judge_options.<judge>``) are its ``Params`` class, a ``JudgeParams`` subclass
(typed, one docstring per field, unknown keys are errors), like the methods' ``Params``. The judge is
built from validated Params (``Judge(params)``) or, for convenience, from keyword options
(``KeywordJudge(min_words=3)``), which are validated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from pydantic import ValidationError

from alignshield.config import ConfigError, Strict, format_validation
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


class JudgeParams(Strict):
    """Base of every judge's options class (``evaluate.judge_options.<judge>``): defaults, documented
    per field; an unknown key is an error."""


def validate_params(name: str, cls: type[JudgeParams], options: Mapping[str, Any] | None) -> JudgeParams:
    """``options`` as judge ``name``'s ``cls``; ConfigError naming ``evaluate.judge_options.<name>.<field>``
    and the problem (an unknown key: the closest known one, and all of them)."""
    try:
        return cls(**dict(options or {}))
    except ValidationError as err:
        raise ConfigError(format_validation(err, cls, prefix=f"evaluate.judge_options.{name}")) from None


def judge_params(judge: Any, params: JudgeParams | Mapping[str, Any] | None, options: Mapping[str, Any]) -> Any:
    """A judge constructor's validated Params: ``params`` (its ``Params`` instance or a dict), or the
    keyword ``options`` when ``params`` is None (``KeywordJudge(min_words=3)``)."""
    cls = judge.Params
    if params is None:
        return validate_params(judge.name, cls, options)
    if options:
        raise TypeError(f"judge {judge.name!r}: give its Params or keyword options, not both")
    if isinstance(params, cls):
        return params
    if isinstance(params, Mapping):
        return validate_params(judge.name, cls, params)
    raise TypeError(f"judge {judge.name!r} takes a {cls.__name__}, not a {type(params).__name__}")


# name -> judge class (or factory): ``Params`` (a JudgeParams subclass), built as ``factory(params)``;
# heavy judges import their dependencies lazily.
JUDGES: Registry = Registry("judge")
