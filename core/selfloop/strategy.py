"""Base classes for strategies, one per stage, plus tasks and model providers.

Subclassing is optional: the registry checks for ``name``, a dataclass ``Config`` and the
stage's method (duck typing). The bases document the contract and give a default
``__init__(config)``. This module must stay import-light: plugins import it at discovery.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # heavy imports only for type checkers
    from datasets import Dataset

    from selfloop.context import RunContext
    from selfloop.model import ModelHandle


@dataclass
class EmptyConfig:
    """Config for a strategy that takes no options."""


class Strategy:
    """Common base: a named, configurable implementation of one stage.

    Two validation points, both run when a run is composed, before anything is written:

    - the ``Config`` dataclass's ``__post_init__`` checks option values on their own and
      raises :class:`selfloop.errors.OptionError` (``OptionError("min_agreement", value,
      "a number in [0, 1]")``; the core adds the ``<kind>.<name>.`` prefix);
    - ``setup(ctx)`` checks the strategy against the run (its task, the other strategies,
      loop options) and may keep what it needs from ``ctx``. Raise ``OptionError`` or
      :class:`selfloop.errors.SelfloopError` when the strategy cannot do its job in this run;
      call ``ctx.warn(name, message)`` when it can do only part of it.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = EmptyConfig

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def setup(self, ctx: RunContext) -> None:
        """Called once per process when the run is built (``ctx.model`` is not yet set)."""


@dataclass(frozen=True)
class Problem:
    """One task instance. ``reference`` is ground truth: the core keeps it from training."""

    prompt: str
    reference: str | None
    difficulty: int


@dataclass
class Generation:
    """What generation (possibly refined) produced for one prompt.

    ``answer`` is the chosen pseudo-label; ``agreement`` the share of ``completions`` that
    agree with it (``None`` when a single greedy completion gives no such signal).
    ``extra`` carries what refiners add; the model's own generation sets
    ``extra["sampling"] = {"temperature": t, "n": n, "logprobs": [...]}`` (the mean token
    log-probability of each completion under the model, EOS included), which acquirers keep
    per row (columns ``temperature`` and ``completion_logprobs``). A refiner that replaces
    ``completions`` should replace or drop ``extra["sampling"]`` to keep them aligned.
    """

    prompt: str
    completions: list[str]
    answer: str
    agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# A generation function: prompts (+ sampling options) -> one Generation per prompt.
Generate = Callable[..., "list[Generation]"]


class Task(Strategy):
    """Where prompts come from: difficulty levels, references and a checker."""

    #: the characters a from-scratch tokenizer must cover (``None`` for free text).
    alphabet: ClassVar[str | None] = None
    #: False for a task with no ground truth at all: the loop runs on autonomous signals
    #: alone, drops reference-using evaluators and says that no meta-evaluation exists.
    has_references: ClassVar[bool] = True
    #: True for a task whose ``sample`` draws from a finite unlabelled pool (e.g. a dataset's
    #: rows) separate from the bootstrap's labelled split: acquirers then draw at every level,
    #: the bootstrap's included (for synthetic tasks they skip the levels the bootstrap labelled).
    unlabelled_pool: ClassVar[bool] = False

    @property
    def levels(self) -> list[int]:
        """Difficulty levels, easiest first."""
        raise NotImplementedError

    @property
    def bootstrap_levels(self) -> list[int]:
        """The levels round 0 labels when ``loop.bootstrap.levels`` is null (default: the
        easier half); the curriculum then starts at the next level."""
        levels = list(self.levels)
        return levels[: max(1, len(levels) // 2)]

    def sample(self, rng: random.Random, level: int, n: int) -> list[Problem]:
        """Draw ``n`` problems of one difficulty level."""
        raise NotImplementedError

    def extract_answer(self, completion: str) -> str:
        """The answer inside a completion (default: the stripped text)."""
        return completion.strip()

    def check(self, answer: str, reference: str) -> bool:
        """Ground-truth check; used only for meta-evaluation and the bootstrap."""
        return self.extract_answer(answer) == reference

    def is_well_formed(self, problem_prompt: str, answer: str) -> bool:
        """A label-free format check on an answer (length, alphabet...)."""
        return bool(answer)

    def max_new_tokens(self, level: int) -> int:
        """An upper bound on answer length in tokens, to stop generation early."""
        return 64


class ModelProvider(Strategy):
    """Builds the initial model of a run: ``build(ctx) -> ModelHandle``."""

    def build(self, ctx: RunContext) -> ModelHandle:
        raise NotImplementedError

    def load(self, ctx: RunContext, path) -> ModelHandle:
        """A model this run saved (a round's candidate), reloaded to evaluate, promote or
        resume. Override to load onto another device or generation backend."""
        from selfloop.model import ModelHandle

        return ModelHandle.load(path, device=ctx.device)


class Acquirer(Strategy):
    """Stage 1: produce candidate training rows."""

    def acquire(self, ctx: RunContext) -> Dataset:
        raise NotImplementedError


class Filter(Strategy):
    """Stage 2: score rows (column ``score_<name>``) and drop the unwanted ones."""

    def filter(self, ctx: RunContext, data: Dataset) -> Dataset:
        raise NotImplementedError


class Optimizer(Strategy):
    """Stage 3: train a new candidate model from the incumbent and the kept rows."""

    def optimize(self, ctx: RunContext, data: Dataset) -> ModelHandle:
        raise NotImplementedError


class Refiner(Strategy):
    """Stage 4: wrap generation (voting, self-correction, retrieval...)."""

    def refine(self, ctx: RunContext, prompts: list[str], generate: Generate) -> list[Generation]:
        raise NotImplementedError


class Evaluator(Strategy):
    """The evaluation layer: per-row scores and whole-model metrics."""

    #: True when the evaluator reads ground truth: reported as meta-evaluation only.
    uses_references: ClassVar[bool] = False

    def score(self, ctx: RunContext, data: Dataset) -> list[float]:
        raise NotImplementedError

    def evaluate(self, ctx: RunContext, model: ModelHandle) -> dict[str, float]:
        raise NotImplementedError


# The method each kind of strategy must provide, checked at registration.
REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "task": ("sample",),
    "model": ("build",),
    "acquire": ("acquire",),
    "filter": ("filter",),
    "optimize": ("optimize",),
    "refine": ("refine",),
    "evaluate": ("score", "evaluate"),
}
