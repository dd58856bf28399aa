"""The selfloop pytest plugin (entry point ``pytest11``): fixtures for plugin authors.

Loaded automatically wherever selfloop is installed; every fixture is prefixed
``selfloop_`` and none is autouse, so other projects' test suites are unaffected.
Import-light: torch and datasets load only when a fixture is used.
"""

from __future__ import annotations

import os

import pytest

from selfloop.testing import helpers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "selfloop_contract: a test from a selfloop contract suite")


@pytest.fixture
def selfloop_hydra():
    """Restore Hydra's process-wide singletons (GlobalHydra, selfloop's ConfigStore groups)
    after the test, so configs composed in one test cannot leak into the next."""
    with helpers.restored_hydra():
        yield


@pytest.fixture
def selfloop_offline(monkeypatch):
    """No hub downloads: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 for the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "false"))


@pytest.fixture
def selfloop_register(selfloop_hydra):
    """``selfloop_register(*classes, kind=None, strict=True) -> Plugins``: the installed
    plugins plus ``classes`` registered in-process, as if a package provided them. The kind
    is inferred from each class's stage method unless given."""
    return helpers.plugins_with


@pytest.fixture
def selfloop_compose(selfloop_hydra):
    """``selfloop_compose(overrides=(), plugins=None) -> DictConfig``: the run config that
    ``selfloop run OVERRIDES`` would compose (unselected presets pruned)."""
    return helpers.compose


@pytest.fixture
def selfloop_ctx(selfloop_hydra, selfloop_offline, tmp_path):
    """``selfloop_ctx(overrides=(), plugins=None, level=3, round=1, with_model=False)``: a
    RunContext of a ``loop=smoke`` run in a temporary directory, nothing executed."""
    counter = iter(range(1_000_000))

    def build(overrides=(), plugins=None, **options):
        return helpers.build_ctx(tmp_path / f"ctx-{next(counter)}", overrides, plugins, **options)

    return build


@pytest.fixture
def selfloop_smoke_loop(selfloop_hydra, selfloop_offline, tmp_path):
    """``selfloop_smoke_loop(overrides=(), plugins=None, rounds=1, quick=True) -> SmokeRun``:
    run the smoke loop (bootstrap + ``rounds`` rounds; ``quick`` trains a few dozen steps, so
    about 10 s per round on 2 CPU cores) in a temporary directory; return its status and
    round records."""
    counter = iter(range(1_000_000))

    def run(overrides=(), plugins=None, rounds: int = 1, quick: bool = True):
        return helpers.smoke_loop(tmp_path / f"smoke-{next(counter)}", overrides, plugins, rounds, quick)

    return run
