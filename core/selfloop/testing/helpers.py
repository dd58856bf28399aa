"""Plain functions behind the pytest fixtures, usable from notebooks and scripts too."""

from __future__ import annotations

import contextlib
import copy
import random
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from selfloop.hookspecs import hookimpl
from selfloop.plugins import REGISTRATION_HOOKS, Plugins, load_plugins
from selfloop.registry import KINDS
from selfloop.strategy import REQUIRED_METHODS

# Checked most specific first: an evaluator has `score` and `evaluate`, a task `sample`.
_KIND_ORDER = ("evaluate", "task", "model", "acquire", "filter", "optimize", "refine")


def infer_kind(cls: type) -> str:
    """The kind a strategy class belongs to, from the stage method it implements."""
    matches = [k for k in _KIND_ORDER if all(callable(getattr(cls, m, None)) for m in REQUIRED_METHODS[k])]
    if len(matches) != 1:
        found = ", ".join(matches) or "none"
        raise TypeError(
            f"cannot tell which kind {cls.__name__} is (matches: {found}); pass kind= one of {', '.join(KINDS)}"
        )
    return matches[0]


def in_process_plugin(*classes: type, kind: str | None = None, name: str = "in_process") -> types.ModuleType:
    """A plugin module registering ``classes``, as if an installed package provided it."""
    module = types.ModuleType(name)
    by_kind: dict[str, list[type]] = {}
    for cls in classes:
        by_kind.setdefault(kind or infer_kind(cls), []).append(cls)
    for k, group in by_kind.items():

        def register_all(register, _group=tuple(group)):  # pluggy ignores defaulted arguments
            for cls in _group:
                register(cls)

        setattr(module, REGISTRATION_HOOKS[k], hookimpl(register_all))
    return module


def plugins_with(*classes: type, kind: str | None = None, strict: bool = True, extra: dict[str, Any] | None = None) -> Plugins:
    """Installed plugins plus ``classes`` registered in-process (strict by default)."""
    plugins = dict(extra or {})
    if classes:
        plugins["in_process"] = in_process_plugin(*classes, kind=kind)
    return load_plugins(extra=plugins, strict=strict)


@contextlib.contextmanager
def restored_hydra() -> Iterator[None]:
    """Undo what composing configs does to Hydra's process-wide singletons: selfloop's
    ConfigStore groups and the GlobalHydra instance."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    # Only selfloop's entries: Hydra registers its own lazily, once per process.
    ours = [*KINDS, "selfloop_schema.yaml"]
    store = ConfigStore.instance()
    saved = {k: copy.deepcopy(store.repo[k]) for k in ours if k in store.repo}
    try:
        yield
    finally:
        for k in ours:
            store.repo.pop(k, None)
        store.repo.update(saved)
        GlobalHydra.instance().clear()


def compose(overrides: Sequence[str] = (), plugins: Plugins | None = None):
    """A composed, pruned run config, exactly as ``selfloop run`` would build it."""
    from selfloop.config import compose as compose_config

    plugins = plugins or load_plugins(strict=True)
    return compose_config(list(overrides), plugins.registry)


def build_ctx(run_dir: Path, overrides: Sequence[str] = (), plugins: Plugins | None = None, *, level: int = 3,
              round: int = 1, with_model: bool = False, preset: str = "loop=smoke"):
    """A RunContext for a smoke-size run (nothing executed), optionally with its initial model."""
    from selfloop.context import seed_everything
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir

    plugins = plugins or load_plugins(strict=True)
    cfg = compose([preset, *overrides] if preset else list(overrides), plugins)
    ctx = Loop(cfg, RunDir(Path(run_dir)), plugins, echo=lambda s: None).ctx
    ctx.round, ctx.level, ctx.stage, ctx.rng = round, level, "test", random.Random(0)
    if with_model:
        seed_everything(0)
        ctx.model = ctx.strategies["model"][0].build(ctx)
    return ctx


@dataclass
class SmokeRun:
    """What a finished smoke loop left behind."""

    run_dir: Path
    status: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def stage_metrics(self, round_: int, stage: str) -> dict[str, Any]:
        from selfloop.rundir import RunDir

        return RunDir(self.run_dir).stage_metrics(round_, stage)


# Enough training for every code path to run, not for the model to learn much: plugin tests
# check wiring and contracts in seconds (the full smoke bootstrap takes 800 steps).
QUICK = ("loop.bootstrap.optimize.sft.max_steps=60", "optimize.sft.max_steps=10")


def smoke_loop(run_dir: Path, overrides: Sequence[str] = (), plugins: Plugins | None = None, rounds: int = 1,
               quick: bool = True) -> SmokeRun:
    """Run ``loop=smoke`` (bootstrap + ``rounds`` self-improvement rounds) in ``run_dir``.

    ``quick`` (the default) trains only a few dozen steps (``QUICK``), about 10 s a round on
    2 CPU cores: pass ``quick=False`` when a test needs the model to learn. ``overrides``
    apply last and win either way.
    """
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir

    plugins = plugins or load_plugins(strict=True)
    cfg = compose(["loop=smoke", f"loop.rounds={rounds}", *overrides], plugins)
    if quick and "sft" in cfg.optimize:  # QUICK's options are sft's (a recipe may choose another)
        cfg = compose(["loop=smoke", f"loop.rounds={rounds}", *QUICK, *overrides], plugins)
    rd = RunDir(Path(run_dir))
    status = Loop(cfg, rd, plugins, echo=lambda s: None).execute()
    return SmokeRun(Path(run_dir), status, rd.records())
