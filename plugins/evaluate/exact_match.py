"""Ground-truth exact match per difficulty level: meta-evaluation of the loop.

It reads references, so the core reports it (accuracy curves, label precision) and never
lets it steer promotion or training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Evaluator


@dataclass
class ExactMatchConfig:
    n_per_level: int = 200

    def __post_init__(self):
        if self.n_per_level < 1:
            raise OptionError("n_per_level", self.n_per_level, "an integer >= 1")


class ExactMatch(Evaluator):
    name = "exact_match"
    Config = ExactMatchConfig
    uses_references = True

    def score(self, ctx, data):
        if "reference" not in data.column_names:
            raise ValueError("evaluate.exact_match scores rows against references; this data has none")
        return [float(r is not None and ctx.task.check(a, r)) for a, r in zip(data["answer"], data["reference"])]

    def evaluate(self, ctx, model):
        rng = random.Random(f"{ctx.seed}:eval:{self.name}")  # the same test set every round
        by_level = {}
        for level in ctx.eval_levels:
            problems = ctx.task.sample(rng, level, self.config.n_per_level)
            outs = model.generate([p.prompt for p in problems], max_new_tokens=ctx.task.max_new_tokens(level))
            by_level[str(level)] = sum(ctx.task.check(o[0], p.reference) for o, p in zip(outs, problems)) / len(problems)
        return {"score": sum(by_level.values()) / len(by_level), "by_level": by_level}


@hookimpl
def selfloop_register_evaluators(register):
    register(ExactMatch)
