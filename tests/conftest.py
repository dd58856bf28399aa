"""Shared fixtures. Tests never touch the network: models are built and trained here."""

from __future__ import annotations

import os
import random
import sys

import pytest

pytest_plugins = ["pytester"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# what the selfloop command does before torch loads: idle OpenMP threads sleep instead of
# spinning, so tests beside other CPU-bound work slow down by a share, not by 4x
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# `pytest -n N` (pytest-xdist, the README's command): N workers share the cores, so each gets its
# share of threads; the runs its tests start inherit it
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    from selfloop.threads import cores

    os.environ["OMP_NUM_THREADS"] = str(max(1, cores() // _WORKERS))
    if "torch" in sys.modules:  # imported before this file (by a plugin): too late for the variable
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def restore_hydra(selfloop_hydra):
    """Every test gets clean Hydra singletons (the fixture ships with selfloop.testing)."""


@pytest.fixture(scope="session")
def plugins():
    from selfloop.plugins import load_plugins

    return load_plugins(strict=True)


@pytest.fixture
def make_ctx(plugins, selfloop_ctx):
    """Build a RunContext for the smoke config (or overridden), without running the loop."""

    def build(overrides: list[str] | None = None, level: int = 3, round_: int = 1, model=None):
        ctx = selfloop_ctx(overrides or [], plugins, level=level, round=round_)
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


@pytest.fixture
def fake_presets(tmp_path, monkeypatch):
    """An installed distribution (dist-info on sys.path) whose `selfloop.presets` entry point
    ships a loop preset that selects one filter and sets its option."""
    root = tmp_path / "site"
    (root / "fake_presets" / "loop").mkdir(parents=True)
    (root / "fake_presets" / "__init__.py").write_text("")
    (root / "fake_presets" / "loop" / "tight.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - smoke\n  - override /filter: [uncertainty]\n"
        "filter:\n  uncertainty:\n    min_agreement: 0.5\n"
        "loop:\n  rounds: 1\n"
    )
    info = root / "fake_presets-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-presets\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[selfloop.presets]\nfake = fake_presets\n")
    monkeypatch.syspath_prepend(str(root))
    yield
    sys.modules.pop("fake_presets", None)


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """datasets converts each file it loads into its cache: keep the tests' conversions out of
    the user's ~/.cache (children started by the tests inherit the variable)."""
    from pathlib import Path

    import datasets

    folder = str(tmp_path_factory.mktemp("hf-datasets-cache"))
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(folder))
    patch.setenv("HF_DATASETS_CACHE", folder)
    yield folder
    patch.undo()
