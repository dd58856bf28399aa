"""Round-trip (cycle-consistency) self-verification: keep a row only if the model, asked
the task's inverse question about its own answer, gives back the original input.

For string reversal the inverse of ``"123=" -> "321"`` is ``"321=" -> "123"``: a wrong
answer survives only if the model makes the mirror-image mistake on the way back, so errors
that voting lets through (the same wrong answer every time) are caught. Needs no labels;
tasks opt in by implementing ``inverse(prompt, answer)``; on a task without one the run
refuses to start (the filter could not check anything).
"""

from __future__ import annotations

from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Filter


@dataclass
class RoundtripConfig:
    batch_size: int = 1000

    def __post_init__(self):
        if self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, "an integer >= 1")


class Roundtrip(Filter):
    name = "roundtrip"
    Config = RoundtripConfig

    def setup(self, ctx):
        if not callable(getattr(ctx.task, "inverse", None)):
            raise SelfloopError(
                f"filter 'roundtrip' cannot check task {ctx.task.name!r}: the task has no inverse(prompt, answer); "
                f"leave it out (e.g. filter=[uncertainty]) or use a task with an inverse"
            )

    def filter(self, ctx, data):
        inverse = ctx.task.inverse
        questions = [inverse(p, a) for p, a in zip(data["prompt"], data["answer"])]
        asked = [i for i, q in enumerate(questions) if q is not None]
        scores = [float("nan")] * len(data)
        for start in range(0, len(asked), self.config.batch_size):
            chunk = asked[start : start + self.config.batch_size]
            longest = max(len(questions[i][0]) for i in chunk)
            gens = ctx.generate([questions[i][0] for i in chunk], max_new_tokens=longest + 2, refine=False)
            for i, gen in zip(chunk, gens):
                scores[i] = float(gen.answer == questions[i][1])
        data = data.add_column(f"score_{self.name}", scores)
        return data.select([i for i, s in enumerate(scores) if s != 0.0])


@hookimpl
def selfloop_register_filters(register):
    register(Roundtrip)
