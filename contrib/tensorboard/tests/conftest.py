"""Fixtures for the tensorboard plugin's tests. Hydra, offline and smoke-loop fixtures come from
selfloop's pytest plugin (selfloop.testing, loaded automatically wherever selfloop is installed)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _isolated(selfloop_hydra, monkeypatch):
    """Clean Hydra singletons, no inherited redirect, and no writer left open for the next test."""
    import selfloop_tensorboard as tb

    monkeypatch.delenv(tb.ENV_DIR, raising=False)
    yield
    tb._close_all()


@pytest.fixture
def make_ctx(tmp_path):
    """A minimal stand-in for the run context: what the observer hooks read."""
    from omegaconf import OmegaConf

    from selfloop.rundir import RunDir

    def build(name="run"):
        cfg = OmegaConf.create({"seed": 0, "loop": {"rounds": 2}, "filter": {"uncertainty": {"min_agreement": 0.75}}})
        return SimpleNamespace(run_dir=RunDir(tmp_path / name), cfg=cfg, round=0, level=4)

    return build
