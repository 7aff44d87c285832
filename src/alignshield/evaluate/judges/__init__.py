"""Harmfulness judges, by name. Importing this module is cheap: judges load their weights on use."""

from __future__ import annotations

# importing the modules registers the judges
from alignshield.evaluate.judges import beaverdam, embedded, hf_classifier, keyword, llamaguard  # noqa: F401
from alignshield.evaluate.judges import guards  # noqa: F401  (harmaug-guard, duoguard, qwen3guard)
from alignshield.evaluate.judges.base import JUDGES, Judge, JudgeLoadError, JudgeParams, Verdict, validate_params

__all__ = ["JUDGES", "Judge", "JudgeLoadError", "JudgeParams", "Verdict", "check_available", "check_options",
           "judge_version", "make_judge", "option_names", "params_class"]


def params_class(name: str) -> type[JudgeParams] | None:
    """The judge's options class (its ``Params``), or None for a plain factory without one (a plugin's),
    which gets its options as keyword arguments, unchecked."""
    return getattr(JUDGES.get(name), "Params", None)


def option_names(name: str) -> list[str] | None:
    """The options a judge accepts (its Params fields), or None when it declares no Params."""
    cls = params_class(name)
    return list(cls.model_fields) if cls is not None else None


def check_options(name: str, options: dict | None) -> JudgeParams | None:
    """Fail before any compute when ``evaluate.judge_options.<name>`` is not a valid Params of the judge
    (an unknown key, a wrong type, a value out of range): ConfigError naming the field. Returns the
    validated Params (None for a judge without Params)."""
    cls = params_class(name)
    return validate_params(name, cls, options) if cls is not None else None


def check_available(name: str, options: dict | None = None) -> None:
    """Before any compute: the judge's options are valid and what it loads is there (files, packages,
    a local model folder); raises ConfigError / JudgeLoadError. Nothing heavy is loaded."""
    params = check_options(name, options)
    check = getattr(JUDGES.get(name), "check_available", None)
    if check is not None and params is not None:
        check(params)
    elif check is not None:
        check(**(options or {}))


def judge_version(name: str, options: dict | None = None) -> str | None:
    """What identifies the judge's behaviour beyond its options (e.g. a digest of its shipped weights),
    or None. Part of the evaluation's stage key: a retrained judge never reuses stale verdicts. A
    callable ``version`` receives the validated Params; the stage key holds the options as given."""
    version = getattr(JUDGES.get(name), "version", None)
    if not callable(version):
        return version
    params = check_options(name, options)
    return version(params) if params is not None else version(**(options or {}))


def make_judge(name: str, options: dict | None = None) -> Judge:
    factory = JUDGES.get(name)
    params = check_options(name, options)
    try:
        return factory(params) if params is not None else factory(**(options or {}))
    except JudgeLoadError:
        raise
    except Exception as err:  # a judge that cannot load must say which one, why, and what else there is
        others = ", ".join(n for n in JUDGES.names() if n != name)
        raise JudgeLoadError(
            f"judge {name!r} could not load: {type(err).__name__}: {err}. "
            f"Check evaluate.judge_options.{name}, or use another judge: {others} (keyword needs no weights)."
        ) from err
