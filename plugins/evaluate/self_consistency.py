"""Autonomous evaluation by self-consistency: how often the model agrees with itself.

On a fixed set of unlabelled prompts per difficulty level (the same set every round, so
scores compare across rounds), sample several answers and measure the share that agree
with the majority. Needs no references; the promotion gate uses it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Evaluator
from selfloop_plugins.filter.uncertainty import agreement
from selfloop_plugins.refine.self_consistency import majority


@dataclass
class SelfConsistencyEvalConfig:
    n_per_level: int = 64
    n_samples: int = 5
    temperature: float = 0.7

    def __post_init__(self):
        if self.n_per_level < 1:
            raise OptionError("n_per_level", self.n_per_level, "an integer >= 1")
        if self.n_samples < 2:
            raise OptionError("n_samples", self.n_samples, "an integer >= 2 (one sample always agrees with itself)")
        if self.temperature <= 0:
            raise OptionError("temperature", self.temperature, "a number > 0 (agreement needs sampled answers)")


class SelfConsistencyEval(Evaluator):
    name = "self_consistency"
    Config = SelfConsistencyEvalConfig
    uses_references = False

    def score(self, ctx, data):
        return [agreement(ctx.task, comps, ans) for comps, ans in zip(data["completions"], data["answer"])]

    def evaluate(self, ctx, model):
        c = self.config
        rng = random.Random(f"{ctx.seed}:eval:{self.name}")  # fixed across rounds
        by_level = {}
        for level in ctx.eval_levels:
            prompts = [p.prompt for p in ctx.task.sample(rng, level, c.n_per_level)]
            outs = model.generate(prompts, n=c.n_samples, temperature=c.temperature, max_new_tokens=ctx.task.max_new_tokens(level))
            shares = [majority([ctx.task.extract_answer(x) for x in o])[1] for o in outs]
            by_level[str(level)] = sum(shares) / len(shares)
        return {"score": sum(by_level.values()) / len(by_level), "by_level": by_level}


@hookimpl
def selfloop_register_evaluators(register):
    register(SelfConsistencyEval)
