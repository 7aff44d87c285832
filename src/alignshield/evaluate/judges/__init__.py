"""Harmfulness judges, by name. Importing this module is cheap: judges load their weights on use."""

from alignshield.evaluate.judges import keyword  # noqa: F401  (registers)
from alignshield.evaluate.judges.base import JUDGES, Judge, JudgeLoadError, Verdict

__all__ = ["JUDGES", "Judge", "JudgeLoadError", "Verdict", "make_judge"]


def make_judge(name: str, options: dict | None = None) -> Judge:
    factory = JUDGES.get(name)
    try:
        return factory(**(options or {}))
    except JudgeLoadError:
        raise
    except Exception as err:  # a judge that cannot load must say which one, and what else there is
        raise JudgeLoadError(
            f"judge {name!r} could not load: {err}. Available judges: {', '.join(JUDGES.names())}"
        ) from err
