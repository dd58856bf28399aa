"""Self-consistency: sample several completions and answer with the majority vote.

The share of samples that agree with the majority is the answer's ``agreement``, the
label-free confidence the ``uncertainty`` filter and the curriculum use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.strategy import Generation, Refiner


@dataclass
class SelfConsistencyConfig:
    n_samples: int = 5
    temperature: float = 0.7


def majority(answers: list[str]) -> tuple[str, float]:
    """The most common answer (ties: the first seen) and its share of the votes."""
    if not answers:
        return "", 0.0
    answer, votes = Counter(answers).most_common(1)[0]
    return answer, votes / len(answers)


class SelfConsistency(Refiner):
    name = "self_consistency"
    Config = SelfConsistencyConfig

    def refine(self, ctx, prompts, generate):
        c = self.config
        if c.n_samples < 1 or c.temperature <= 0:
            raise ValueError("refine.self_consistency needs n_samples >= 1 and temperature > 0")
        out = []
        for gen in generate(prompts, n=c.n_samples, temperature=c.temperature):
            answers = [ctx.task.extract_answer(x) for x in gen.completions]
            answer, agreement = majority(answers)
            out.append(Generation(gen.prompt, gen.completions, answer, agreement, gen.extra))
        return out


@hookimpl
def selfloop_register_refiners(register):
    register(SelfConsistency)
