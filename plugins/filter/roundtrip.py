"""Round-trip (cycle-consistency) self-verification: keep a row only if the model, asked
the task's inverse question about its own answer, gives back the original input.

For string reversal the inverse of ``"123=" -> "321"`` is ``"321=" -> "123"``: a wrong
answer survives only if the model makes the mirror-image mistake on the way back, so errors
that voting lets through (the same wrong answer every time) are caught. Needs no labels;
tasks opt in by implementing ``inverse(prompt, answer)``. Rows of tasks without an inverse
are kept and scored ``nan``.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.strategy import Filter


@dataclass
class RoundtripConfig:
    batch_size: int = 1000


class Roundtrip(Filter):
    name = "roundtrip"
    Config = RoundtripConfig

    def filter(self, ctx, data):
        inverse = getattr(ctx.task, "inverse", None)
        questions = [inverse(p, a) if inverse else None for p, a in zip(data["prompt"], data["answer"])]
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
