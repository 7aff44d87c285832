"""One small registry type: stages and judges look methods up by name, never branch on them.

Other packages add methods, judges or tasks without editing alignshield through the entry-point group
``alignshield.methods`` (like PEFT's ``register_peft_method``). Each entry point names a module
(importing it registers its methods with the registries' ``register`` decorators) or a callable
(called once, without arguments). They load the first time any registry is read; see
docs/architecture.md for a 20-line example.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "alignshield.methods"
_plugins_loaded = False


class PluginError(RuntimeError):
    """A plugin entry point failed to load: the message names the entry point and its package."""


def load_plugins() -> None:
    """Import every ``alignshield.methods`` entry point once (the first registry read calls this)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # first: a plugin reading a registry while it loads must not recurse
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as err:  # noqa: BLE001 -- name the culprit, whatever it raised
            where = f" (package {ep.dist.name})" if getattr(ep, "dist", None) else ""
            raise PluginError(f"alignshield plugin {ep.name!r} = {ep.value!r}{where} failed to load: "
                              f"{type(err).__name__}: {err}") from err
        log.debug("loaded alignshield plugin %s = %s", ep.name, ep.value)

T = TypeVar("T")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._entries:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}"
