"""selfloop's filter contract suite, run against both backends (in a real run context)."""

from __future__ import annotations

import pytest

from selfloop.testing import FilterContract
from selfloop_semantic_dedup import SemanticDedup


class TestTfidfContract(FilterContract):
    @pytest.fixture
    def strategy(self):
        return SemanticDedup(SemanticDedup.Config(backend="tfidf", threshold=0.8))


class TestMiniLMContract(FilterContract):
    @pytest.fixture
    def strategy(self, minilm):
        return SemanticDedup(SemanticDedup.Config(backend="minilm", within_difficulty=True))
