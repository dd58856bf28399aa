"""Keep rows whose pseudo-label the model is confident about, without labels.

Confidence is agreement: the share of a row's sampled completions that match its chosen
answer (self-consistency). A label-free format check (the task's ``is_well_formed``:
right length, right alphabet) drops malformed answers, which voting alone lets through.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Filter


@dataclass
class UncertaintyConfig:
    min_agreement: float = 1.0
    require_well_formed: bool = True

    def __post_init__(self):
        if not 0.0 <= self.min_agreement <= 1.0:
            raise OptionError("min_agreement", self.min_agreement, "a number in [0, 1]")


def agreement(task, completions: list[str], answer: str) -> float:
    if not completions:
        return 0.0
    return sum(task.extract_answer(c) == answer for c in completions) / len(completions)


class Uncertainty(Filter):
    name = "uncertainty"
    Config = UncertaintyConfig

    def filter(self, ctx, data):
        c = self.config
        task = ctx.task
        scores = [agreement(task, comps, ans) for comps, ans in zip(data["completions"], data["answer"])]
        data = data.add_column(f"score_{self.name}", scores)
        keep = [
            i
            for i, (s, p, a) in enumerate(zip(scores, data["prompt"], data["answer"]))
            if s >= c.min_agreement - 1e-9 and (not c.require_well_formed or task.is_well_formed(p, a))
        ]
        return data.select(keep)


@hookimpl
def selfloop_register_filters(register):
    register(Uncertainty)
