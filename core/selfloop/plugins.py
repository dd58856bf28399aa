"""Plugin discovery: entry points in the ``selfloop`` group, loaded one by one, guarded.

A plugin that fails to import or raises in a registration hook is reported with its name,
distribution, version and error, and the others still load. ``SELFLOOP_STRICT_PLUGINS=1``
turns every such problem into an error (for CI). ``SELFLOOP_DISABLE_PLUGINS=a,b`` skips
plugins by entry-point name.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from selfloop import hookspecs
from selfloop.errors import PluginError, add_note
from selfloop.registry import Registry

GROUP = "selfloop"
BUILTIN_DISTRIBUTION = "selfloop"
REGISTRATION_HOOKS = {
    "task": "selfloop_register_tasks",
    "model": "selfloop_register_models",
    "acquire": "selfloop_register_acquirers",
    "filter": "selfloop_register_filters",
    "optimize": "selfloop_register_optimizers",
    "refine": "selfloop_register_refiners",
    "evaluate": "selfloop_register_evaluators",
}


class PluginWarning(UserWarning):
    """A plugin was skipped or one of its registrations refused."""


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    module: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Plugins:
    """The loaded plugin manager, the registry it filled, and per-plugin information."""

    manager: pluggy.PluginManager
    registry: Registry
    info: dict[str, PluginInfo]

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def problems(self) -> list[str]:
        return [f"{i.name}: {i.error}" for i in self.info.values() if i.error] + self.registry.problems

    def origin(self, plugin_name: str) -> str:
        info = self.info.get(plugin_name)
        return _origin(info) if info else f"plugin {plugin_name!r}"

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook on every plugin that implements it, in pluggy's order
        (``tryfirst`` first, then the most recently registered). An exception still stops the
        run (a guard may mean to), now noting the plugin that raised it."""
        for impl in reversed(getattr(self.manager.hook, hook_name).get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise PluginError(f"{self.origin(impl.plugin_name)}: {hook_name} is a hook wrapper; observers must be plain @hookimpl functions")
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                add_note(exc, f"raised in {hook_name} by {self.origin(impl.plugin_name)}")
                raise


def _origin(plugin: PluginInfo) -> str:
    return f"plugin {plugin.name!r} ({plugin.distribution or 'not installed'} {plugin.version or ''})".replace(" )", ")")


def strict_mode() -> bool:
    return os.environ.get("SELFLOOP_STRICT_PLUGINS", "").lower() in ("1", "true", "yes")


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get("SELFLOOP_DISABLE_PLUGINS", "").split(",") if n.strip()}


def _distribution(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _load_order(ep: EntryPoint) -> tuple[int, str, str]:
    name, _ = _distribution(ep)
    return (0 if name == BUILTIN_DISTRIBUTION else 1, (name or "").lower(), ep.name)


def load_plugins(extra: dict[str, object] | None = None, strict: bool | None = None) -> Plugins:
    """Discover, import and register every plugin; return the filled registry.

    :param extra: in-process plugins ``{name: module_or_object}`` (tests, notebooks),
        registered after the entry points exactly as if they were installed.
    :param strict: raise on the first plugin problem (default: ``SELFLOOP_STRICT_PLUGINS``).
    """
    strict = strict_mode() if strict is None else strict
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    info: dict[str, PluginInfo] = {}
    disabled = _disabled()

    def report(plugin: PluginInfo, message: str) -> None:
        plugin.error = message if plugin.error is None else f"{plugin.error}; {message}"
        text = f"selfloop {_origin(plugin)}: {message}"
        if strict:
            raise PluginError(text)
        warnings.warn(text, PluginWarning, stacklevel=3)

    candidates: list[tuple[str, Any, str | None, str | None, str]] = []
    for ep in sorted(entry_points(group=GROUP), key=_load_order):
        if ep.name in disabled or ep.name in info:
            continue
        dist, version = _distribution(ep)
        plugin = info[ep.name] = PluginInfo(ep.name, dist, version, ep.value)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            report(plugin, f"failed to import {ep.value}: {type(exc).__name__}: {exc}")
            continue
        candidates.append((ep.name, module, dist, version, ep.value))
    installed = {id(module) for _, module, *_ in candidates}
    for name, obj in (extra or {}).items():
        if id(obj) in installed:  # already registered through its entry point (a contract suite run where it is installed)
            continue
        info[name] = PluginInfo(name, None, None, getattr(obj, "__name__", repr(obj)))
        candidates.append((name, obj, None, None, info[name].module))

    for name, module, _dist, _version, _ in candidates:
        try:
            manager.register(module, name=name)
        except Exception as exc:
            report(info[name], f"could not be registered: {type(exc).__name__}: {exc}")
            continue
        info[name].hooks = sorted(impl.name for impl in manager.get_hookcallers(module) or [])

    registry = Registry()
    for kind, hook_name in REGISTRATION_HOOKS.items():
        # Call each implementation on its own so registrations are attributed and isolated.
        for impl in getattr(manager.hook, hook_name).get_hookimpls():  # registration order
            plugin = info[impl.plugin_name]

            def register(cls: type, _kind: str = kind, _plugin: PluginInfo = plugin) -> None:
                registry.add(_kind, cls, _plugin.name, _plugin.distribution, _plugin.version)

            try:
                returned = impl.function(**{arg: register for arg in impl.argnames})
            except PluginError as exc:
                registry.problems.append(str(exc))
                if strict:
                    raise
                warnings.warn(str(exc), PluginWarning, stacklevel=2)
            except Exception as exc:
                report(plugin, f"raised in {hook_name}: {type(exc).__name__}: {exc}")
            else:
                if returned is not None:  # e.g. `return [MyFilter]`: that registers nothing
                    report(plugin, f"{hook_name} returned a {type(returned).__name__}; call register(cls) for each class instead")
    return Plugins(manager, registry, info)
