"""The registry: every strategy, task and model provider that installed plugins registered.

Names are unique per kind. The rule for duplicates is explicit: the first registration
wins (built-ins load first, then third-party plugins sorted by distribution name); the
later one is reported as a plugin problem naming both sides, and is fatal in strict mode.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from selfloop.errors import PluginError, UnknownStrategyError
from selfloop.strategy import REQUIRED_METHODS, EmptyConfig

STAGES = ("acquire", "filter", "optimize", "refine", "evaluate")
KINDS = ("task", "model", *STAGES)
# Kinds of which a run uses exactly one; the others take an ordered list.
SINGLE_CHOICE = ("task", "model", "optimize")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    cls: type
    plugin: str  # the entry-point name of the plugin that registered it
    distribution: str | None = None
    version: str | None = None


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, cls: type, plugin: str, distribution: str | None = None, version: str | None = None) -> None:
        """Validate and store one registration; raise PluginError naming the culprit."""
        origin = _origin(plugin, distribution, version)
        if kind not in self.entries:
            raise PluginError(f"{origin} registered a {kind!r}; kinds are {', '.join(KINDS)}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(
                f"{origin} registered {cls!r} as a {kind} without a valid `name` "
                f"(lowercase letters, digits and '_', got {name!r})"
            )
        if not hasattr(cls, "Config"):
            cls.Config = EmptyConfig
        if not (isinstance(cls.Config, type) and dataclasses.is_dataclass(cls.Config)):
            raise PluginError(f"{origin}: {kind} {name!r} has a `Config` that is not a dataclass")
        missing = [m for m in REQUIRED_METHODS[kind] if not callable(getattr(cls, m, None))]
        if missing:
            raise PluginError(f"{origin}: {kind} {name!r} lacks the method(s) {', '.join(missing)}")
        existing = self.entries[kind].get(name)
        if existing is not None:
            if existing.cls is cls:
                return
            raise PluginError(
                f"{origin} registered {kind} {name!r}, already registered by "
                f"{_origin(existing.plugin, existing.distribution, existing.version)}; the first one is kept"
            )
        self.entries[kind][name] = Entry(kind, name, cls, plugin, distribution, version)

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            available = ", ".join(sorted(self.entries.get(kind, {}))) or "none installed"
            raise UnknownStrategyError(f"unknown {kind} {name!r}; installed: {available}") from None

    def describe(self, kind: str, name: str) -> str:
        """``filter 'x' from plugin 'p' (dist 1.0)``: how errors name a strategy."""
        entry = self.entries.get(kind, {}).get(name)
        return f"{kind} {name!r}" + (f" from {_origin(entry.plugin, entry.distribution, entry.version)}" if entry else "")

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def by_plugin(self) -> dict[str, dict[str, list[str]]]:
        """{plugin: {kind: [names]}}, for ``selfloop plugins``."""
        out: dict[str, dict[str, list[str]]] = {}
        for kind, entries in self.entries.items():
            for entry in entries.values():
                out.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
        return out


def _origin(plugin: str, distribution: str | None, version: str | None) -> str:
    if distribution:
        return f"plugin {plugin!r} ({distribution} {version or '?'})"
    return f"plugin {plugin!r}"
