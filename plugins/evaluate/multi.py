"""Multi-dimensional autonomous evaluation: task completion, format, safety and length,
each reported on its own and combined with declared weights.

- **completion** (label-free): the share of sampled answers that agree with the greedy one,
  times the round trip (the model maps its own answer back to the input) when the task has
  an ``inverse``. Agreement alone rewards confident errors (``docs/results.md``: agreement
  rose while label precision fell to 0.41); the round trip catches them.
- **format**: the task's ``is_well_formed`` on the greedy answer.
- **safety**: 1 unless the rule/lexicon screen (``patterns``, case-insensitive regular
  expressions) or the optional classifier (``classifier``, ``package.module:function``)
  flags the prompt's greedy or sampled outputs (the screen of ``safety_gate``).
- **length**: 1 for a non-empty answer within ``length_budget`` characters (0: the task's
  ``max_new_tokens`` for the level minus one, so an answer cut off by the generation limit
  loses a little), ``budget / length`` beyond it, 0 when empty.

``score`` is ``sum(w_d * dim_d) / sum(w)`` with the declared ``weights`` (non-negative,
positive sum). It follows the multi-aspect evaluation of HELM (Liang et al. 2023) and the
weighted multi-objective rewards of Safe RLHF (Dai et al. 2024), with label-free dimensions.
``evaluate`` runs on a fixed set of unlabelled prompts per level (the same every round, so
scores compare across rounds). Cost per model and level: ``n_per_level`` x (1 greedy +
``n_samples`` sampled + 1 round-trip) generations.

This module also holds the label-free signals the other evaluators share (``measure``).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Evaluator
from selfloop_plugins.evaluate.safety_gate import DEFAULT_UNSAFE_PATTERNS, SafetyScreen, check_classifier_path, check_patterns, load_classifier
from selfloop_plugins.filter.uncertainty import agreement

DIMENSIONS = ("completion", "format", "safety", "length")


# -- label-free signals shared by the evaluators of this package -----------------------------
def fixed_problems(ctx, name: str, level: int, n: int) -> list:
    """The same unlabelled problems every round for one evaluator and level, so scores
    compare across rounds (the references, if any, are never read)."""
    return ctx.task.sample(random.Random(f"{ctx.seed}:eval:{name}:{level}"), level, n)


@contextlib.contextmanager
def sampling_seed(ctx, *key: Any) -> Iterator[None]:
    """Sample with a seed fixed by the run seed and ``key``: the same model gets the same
    score whenever it is evaluated, and candidate and incumbent share their sampling noise.
    The global torch RNG is restored afterwards."""
    import torch

    from selfloop.context import stage_seed

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(stage_seed(ctx.seed, 0, ":".join(map(str, key))))
        yield


def has_inverse(task) -> bool:
    return callable(getattr(task, "inverse", None))


def roundtrip_passes(task, model, prompts: list[str], answers: list[str]) -> list[float | None]:
    """1.0 where the model, asked the task's inverse question about an answer, gives back
    the original input; 0.0 where not; None where the task has no inverse question for it."""
    questions = [task.inverse(p, a) for p, a in zip(prompts, answers)]
    asked = [i for i, q in enumerate(questions) if q is not None]
    out: list[float | None] = [None] * len(prompts)
    if asked:
        longest = max(len(questions[i][0]) for i in asked)
        outs = model.generate([questions[i][0] for i in asked], max_new_tokens=longest + 2)
        for i, o in zip(asked, outs):
            out[i] = float(task.extract_answer(o[0]) == questions[i][1])
    return out


@dataclass
class Signals:
    """Label-free measurements of a model's answers to some prompts."""

    prompts: list[str]
    completions: list[str]  # the greedy completion, raw
    answers: list[str]  # the answer extracted from it
    samples: list[list[str]]  # sampled completions, raw
    agreement: list[float]  # share of samples whose answer equals the greedy answer (1.0 without samples)
    well_formed: list[bool]
    roundtrip: list[float | None] | None  # None: not measured

    def completion(self) -> list[float]:
        rt = self.roundtrip or [None] * len(self.prompts)
        return [a * (1.0 if r is None else r) for a, r in zip(self.agreement, rt)]


def measure(ctx, model, prompts: list[str], level: int, *, n_samples: int, temperature: float, roundtrip: bool, key: tuple) -> Signals:
    """Greedy answers, sampled answers and (optionally) the round trip, under ``model``."""
    task = ctx.task
    budget = task.max_new_tokens(level)
    with sampling_seed(ctx, *key):
        greedy = [o[0] for o in model.generate(prompts, max_new_tokens=budget)]
        samples = model.generate(prompts, n=n_samples, temperature=temperature, max_new_tokens=budget) if n_samples else [[] for _ in prompts]
    answers = [task.extract_answer(c) for c in greedy]
    agree = [agreement(task, s, a) if s else 1.0 for s, a in zip(samples, answers)]
    formed = [bool(task.is_well_formed(p, a)) for p, a in zip(prompts, answers)]
    rt = roundtrip_passes(task, model, prompts, answers) if roundtrip else None
    return Signals(prompts, greedy, answers, samples, agree, formed, rt)


def length_scores(answers: list[str], budgets: list[int]) -> list[float]:
    return [0.0 if not a else (1.0 if len(a) <= b else b / len(a)) for a, b in zip(answers, budgets)]


def roundtrip_setting(option: str, value: str, task) -> bool:
    """Resolve an ``auto|on|off`` round-trip option against the task."""
    if value == "on" and not has_inverse(task):
        raise SelfloopError(f"{option}=on needs a task with an inverse(prompt, answer); task {task.name!r} has none (use auto or off)")
    return value == "on" or (value == "auto" and has_inverse(task))


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(option, value, ", ".join(choices))


# -- the evaluator -------------------------------------------------------------------------------
@dataclass
class MultiConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"completion": 1.0, "format": 1.0, "safety": 1.0, "length": 0.5})
    n_per_level: int = 32
    n_samples: int = 4
    temperature: float = 0.7
    # completion includes the round trip: auto (when the task has an inverse), on, off
    roundtrip: str = "auto"
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_UNSAFE_PATTERNS))
    classifier: str = ""
    classifier_threshold: float = 0.5
    # characters an answer may have before the length dimension falls (0: the task's
    # max_new_tokens for the level, minus one)
    length_budget: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(DIMENSIONS))
        if unknown:
            raise OptionError(f"weights.{unknown[0]}", self.weights[unknown[0]], f"weights for the dimensions {', '.join(DIMENSIONS)}")
        for dim, w in self.weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise OptionError(f"weights.{dim}", w, "a finite number >= 0")
        if sum(self.weights.values()) <= 0:
            raise OptionError("weights", dict(self.weights), "non-negative weights with a positive sum")
        for option, ok, accepted in (
            ("n_per_level", self.n_per_level >= 1, "an integer >= 1"),
            ("n_samples", self.n_samples >= 0, "an integer >= 0"),
            ("temperature", self.temperature > 0, "a number > 0"),
            ("length_budget", self.length_budget >= 0, "an integer >= 0 (0: from the task)"),
            ("classifier_threshold", 0.0 < self.classifier_threshold <= 1.0, "a number in (0, 1]"),
        ):
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)
        check_choice("roundtrip", self.roundtrip, ("auto", "on", "off"))
        check_patterns("patterns", self.patterns)
        check_classifier_path("classifier", self.classifier)


class Multi(Evaluator):
    name = "multi"
    Config = MultiConfig
    uses_references = False

    def __init__(self, config=None):
        super().__init__(config)
        self._screen: SafetyScreen | None = None

    def setup(self, ctx):
        roundtrip_setting("evaluate.multi.roundtrip", self.config.roundtrip, ctx.task)
        self.screen()

    def screen(self) -> SafetyScreen:
        if self._screen is None:
            c = self.config
            self._screen = SafetyScreen(c.patterns, load_classifier("classifier", c.classifier), c.classifier_threshold)
        return self._screen

    def weights(self) -> dict[str, float]:
        total = sum(self.config.weights.get(d, 0.0) for d in DIMENSIONS)
        return {d: self.config.weights.get(d, 0.0) / total for d in DIMENSIONS}

    def budget(self, ctx, level: int) -> int:
        return self.config.length_budget or max(1, ctx.task.max_new_tokens(level) - 1)

    def safe(self, texts: list[list[str]]) -> list[float]:
        flat = self.screen().flags([t for group in texts for t in group])
        out, i = [], 0
        for group in texts:
            out.append(0.0 if any(flat[i : i + len(group)]) else 1.0)
            i += len(group)
        return out

    def combine(self, dims: dict[str, list[float]]) -> list[float]:
        w = self.weights()
        return [sum(w[d] * dims[d][i] for d in DIMENSIONS) for i in range(len(dims["format"]))]

    def score(self, ctx, data):
        """Per row: the weighted dimensions of the row's answer (agreement from its
        completions; the round trip under the incumbent ``ctx.model``)."""
        task, prompts, answers = ctx.task, list(data["prompt"]), list(data["answer"])
        completions = list(data["completions"])
        agree = [agreement(task, c, a) if c else 1.0 for c, a in zip(completions, answers)]
        rt: list[float | None] = [None] * len(prompts)
        if roundtrip_setting("evaluate.multi.roundtrip", self.config.roundtrip, task) and ctx.model is not None and prompts:
            rt = roundtrip_passes(task, ctx.model, prompts, answers)
        dims = {
            "completion": [a * (1.0 if r is None else r) for a, r in zip(agree, rt)],
            "format": [float(task.is_well_formed(p, a)) for p, a in zip(prompts, answers)],
            "safety": self.safe([[a, *c] for a, c in zip(answers, completions)]),
            "length": length_scores(answers, [self.budget(ctx, d) for d in data["difficulty"]]),
        }
        return self.combine(dims)

    def evaluate(self, ctx, model):
        c = self.config
        roundtrip = roundtrip_setting("evaluate.multi.roundtrip", c.roundtrip, ctx.task)
        by_dimension: dict[str, dict[str, float]] = {d: {} for d in DIMENSIONS}
        by_level: dict[str, float] = {}
        for level in ctx.eval_levels:
            prompts = [p.prompt for p in fixed_problems(ctx, self.name, level, c.n_per_level)]
            s = measure(ctx, model, prompts, level, n_samples=c.n_samples, temperature=c.temperature, roundtrip=roundtrip, key=(self.name, level))
            dims = {
                "completion": s.completion(),
                "format": [float(f) for f in s.well_formed],
                "safety": self.safe([[g, *more] for g, more in zip(s.completions, s.samples)]),
                "length": length_scores(s.answers, [self.budget(ctx, level)] * len(prompts)),
            }
            for d in DIMENSIONS:
                by_dimension[d][str(level)] = sum(dims[d]) / len(prompts)
            by_level[str(level)] = sum(self.combine(dims)) / len(prompts)
        means = {d: sum(v.values()) / len(v) for d, v in by_dimension.items()}
        return {"score": sum(by_level.values()) / len(by_level), "by_level": by_level, **means, "by_dimension": by_dimension, "weights": self.weights()}


@hookimpl
def selfloop_register_evaluators(register):
    register(Multi)
