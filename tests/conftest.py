"""Shared fixtures. Tests never touch the network: models are built and trained here."""

from __future__ import annotations

import copy
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def restore_hydra():
    """Hydra keeps process-wide singletons; give every test a clean GlobalHydra and ConfigStore."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    from selfloop.registry import KINDS

    # Only selfloop's entries: Hydra registers its own lazily, once per process.
    ours = [*KINDS, "selfloop_schema.yaml"]
    store = ConfigStore.instance()
    saved = {k: copy.deepcopy(store.repo[k]) for k in ours if k in store.repo}
    yield
    for k in ours:
        store.repo.pop(k, None)
    store.repo.update(saved)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def plugins():
    from selfloop.plugins import load_plugins

    return load_plugins(strict=True)


@pytest.fixture
def make_ctx(plugins, tmp_path):
    """Build a RunContext for the default (or overridden) config, without running the loop."""

    def build(overrides: list[str] | None = None, level: int = 3, round_: int = 1, model=None):
        from selfloop.config import compose
        from selfloop.loop import Loop
        from selfloop.rundir import RunDir

        cfg = compose(["loop=smoke", *(overrides or [])], plugins.registry)
        loop = Loop(cfg, RunDir(tmp_path / "run"), plugins, echo=lambda s: None)
        ctx = loop.ctx
        ctx.round, ctx.level, ctx.rng = round_, level, random.Random(0)
        ctx.model = model
        return ctx

    return build


@pytest.fixture(scope="session")
def trained_model(plugins, tmp_path_factory):
    """A tiny NoPE model trained briefly on reversal levels 1-3 (shared, read-only)."""
    import torch

    from selfloop.config import compose
    from selfloop.context import seed_everything
    from selfloop.data import make_rows
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir

    cfg = compose(["loop=smoke"], plugins.registry)
    loop = Loop(cfg, RunDir(tmp_path_factory.mktemp("trained")), plugins, echo=lambda s: None)
    ctx = loop.ctx
    seed_everything(0)
    ctx.rng = random.Random(0)
    ctx.model = ctx.strategies["model"][0].build(ctx)
    problems = [p for level in (1, 2, 3) for p in ctx.task.sample(ctx.rng, level, 600)]
    data = make_rows(dict(id=str(i), prompt=p.prompt, answer=p.reference, difficulty=p.difficulty, source="bootstrap") for i, p in enumerate(problems))
    from selfloop_plugins.optimize.sft import SFT, SFTConfig

    torch.manual_seed(0)
    return SFT(SFTConfig(max_steps=800, batch_size=64, learning_rate=3e-3, replay_fraction=0.0)).optimize(ctx, data.remove_columns("reference"))
