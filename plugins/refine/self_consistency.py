"""Self-consistency: sample several completions and answer with the majority vote.

The share of samples that agree with the majority is the answer's ``agreement``, the
label-free confidence the ``uncertainty`` filter and the curriculum use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Generation, Refiner


@dataclass
class SelfConsistencyConfig:
    n_samples: int = 5
    temperature: float = 0.7

    def __post_init__(self):
        if self.n_samples < 1:
            raise OptionError("n_samples", self.n_samples, "an integer >= 1")
        if self.temperature <= 0:
            raise OptionError("temperature", self.temperature, "a number > 0 (voting needs sampled answers)")


def majority(answers: list[str]) -> tuple[str, float]:
    """The most common answer (ties: the first seen) and its share of the votes."""
    if not answers:
        return "", 0.0
    answer, votes = Counter(answers).most_common(1)[0]
    return answer, votes / len(answers)


class SelfConsistency(Refiner):
    name = "self_consistency"
    Config = SelfConsistencyConfig

    def setup(self, ctx):
        if self.config.n_samples == 1:
            ctx.warn(self.name, "n_samples=1: a single sample always agrees with itself (agreement 1.0), so agreement-based filters and the curriculum's pacing cannot tell confident answers from guesses")

    def refine(self, ctx, prompts, generate):
        c = self.config
        out = []
        for gen in generate(prompts, n=c.n_samples, temperature=c.temperature):
            answers = [ctx.task.extract_answer(x) for x in gen.completions]
            answer, agreement = majority(answers)
            out.append(Generation(gen.prompt, gen.completions, answer, agreement, gen.extra))
        return out


@hookimpl
def selfloop_register_refiners(register):
    register(SelfConsistency)
