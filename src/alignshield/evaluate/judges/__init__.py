"""Harmfulness judges, by name. Importing this module is cheap: judges load their weights on use."""

from __future__ import annotations

import inspect

# importing the modules registers the judges
from alignshield.evaluate.judges import beaverdam, embedded, hf_classifier, keyword, llamaguard  # noqa: F401
from alignshield.evaluate.judges import guards  # noqa: F401  (harmaug-guard, duoguard, qwen3guard)
from alignshield.evaluate.judges.base import JUDGES, Judge, JudgeLoadError, Verdict

__all__ = ["JUDGES", "Judge", "JudgeLoadError", "Verdict", "check_available", "check_options", "judge_version",
           "make_judge", "option_names"]


def option_names(name: str) -> list[str] | None:
    """The keyword options a judge accepts, or None when it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(JUDGES.get(name)).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(name: str, options: dict | None) -> None:
    """Fail before any compute when ``evaluate.judge_options.<name>`` has a key the judge does not take."""
    from alignshield.config import ConfigError

    known = option_names(name)
    unknown = sorted(set(options or {}) - set(known)) if known is not None else []
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"evaluate.judge_options.{name}: unknown option(s) {', '.join(map(repr, unknown))} for judge "
            f"{name!r}.{hint} Its options: {', '.join(known) or '(none)'}"
        )


def check_available(name: str, options: dict | None = None) -> None:
    """Before any compute: the judge's options are known and what it loads is there (files, packages,
    a local model folder); raises ConfigError / JudgeLoadError. Nothing heavy is loaded."""
    check_options(name, options)
    check = getattr(JUDGES.get(name), "check_available", None)
    if check is not None:
        check(**(options or {}))


def judge_version(name: str, options: dict | None = None) -> str | None:
    """What identifies the judge's behaviour beyond its options (e.g. a digest of its shipped weights),
    or None. Part of the evaluation's stage key: a retrained judge never reuses stale verdicts."""
    version = getattr(JUDGES.get(name), "version", None)
    return version(**(options or {})) if callable(version) else version


def make_judge(name: str, options: dict | None = None) -> Judge:
    factory = JUDGES.get(name)
    check_options(name, options)
    try:
        return factory(**(options or {}))
    except JudgeLoadError:
        raise
    except Exception as err:  # a judge that cannot load must say which one, why, and what else there is
        others = ", ".join(n for n in JUDGES.names() if n != name)
        raise JudgeLoadError(
            f"judge {name!r} could not load: {type(err).__name__}: {err}. "
            f"Check evaluate.judge_options.{name}, or use another judge: {others} (keyword needs no weights)."
        ) from err
