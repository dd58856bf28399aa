"""Best-of-N: sample N completions per prompt and answer with the one a scorer ranks highest.

Verifier reranking (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems") as a
test-time-compute knob (Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally"): ``n``
trades compute for accuracy with no training. Candidates are ranked by ``select_by``:

- ``logprob`` (default, free): the model's own mean token log-probability of each sample
  (``extra["sampling"]["logprobs"]``); falls back to ``majority`` with a warning when the
  layer below gives none;
- ``majority``: the share of samples with the same answer (self-consistency);
- a critic of ``self_correction`` (``roundtrip``, ``well_formed``, ``model``): one check per
  distinct answer;
- the name of a configured label-free evaluator: its per-row ``score`` on candidate rows
  (prompt, the N samples as ``completions``, the candidate as ``answer``), built with
  ``selfloop.data.make_rows``.

Ties go to the more frequent answer, then the higher log-probability, then the earlier
sample. The samples stay the row's ``completions`` (aligned with ``extra["sampling"]``); the
chosen answer's vote share is its ``agreement``; ``extra["best_of_n"]`` keeps every
candidate's score and the chosen index. Cost per prompt: ``n`` sampled sequences plus the
scorer's cost (a model critic: one greedy generation per distinct answer); the stage notes
count ``sequences_sampled`` and ``scored``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Generation, Refiner
from selfloop_plugins.refine.cot import literal_part, refuse_unreadable, tally, task_prompt
from selfloop_plugins.refine.self_correction import Critic, check_critic

SELF_SCORES = ("logprob", "majority")


@dataclass
class BestOfNConfig:
    n: int = 8
    temperature: float = 0.8
    # logprob | majority | roundtrip | well_formed | model | a configured label-free evaluator's name
    select_by: str = "logprob"
    # critic=model's prompt (see self_correction)
    critique_template: str = "Question: {prompt}\nProposed answer: {answer}\nIs the proposed answer correct? Reply yes or no.\nReply:"

    def __post_init__(self):
        if self.n < 1:
            raise OptionError("n", self.n, "an integer >= 1")
        if self.temperature <= 0:
            raise OptionError("temperature", self.temperature, "a number > 0 (N greedy samples would be identical)")
        if not self.select_by:
            raise OptionError("select_by", self.select_by, "logprob, majority, a self_correction critic or a configured evaluator's name")


class BestOfN(Refiner):
    name = "best_of_n"
    Config = BestOfNConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.critic = None if c.select_by in SELF_SCORES else Critic(self.name, c.select_by, c.critique_template)

    def setup(self, ctx):
        c = self.config
        if self.critic is not None:
            check_critic(ctx, self.name, c.select_by, option="select_by")
        if c.select_by == "model":
            refuse_unreadable(ctx, self.name, "critique_template", literal_part(c.critique_template, "prompt", "answer"))

    def refine(self, ctx, prompts, generate):
        if self.critic is not None and self.critic.busy:  # an evaluator generating through the chain
            return generate(prompts)
        if not prompts:
            return []
        c = self.config
        gens = generate(prompts, n=c.n, temperature=c.temperature)
        answers = [[ctx.task.extract_answer(x) for x in g.completions] for g in gens]
        votes = [[Counter(a)[x] / len(a) for x in a] for a in answers]
        logprobs = [self.logprobs(g) for g in gens]
        select_by, scored = c.select_by, 0
        if select_by == "logprob" and any(lp is None for lp, a in zip(logprobs, answers) if a):
            ctx.warn(self.name, "select_by=logprob: the layer below gives no per-sample log-probabilities; ranking by majority instead")
            select_by = "majority"
        if select_by == "logprob":
            scores = [list(lp) for lp in logprobs]
        elif select_by == "majority":
            scores = votes
        else:
            scores, scored = self.critic_scores(ctx, generate, prompts, gens, answers)
        out = []
        for p, g, a, v, lp, s in zip(prompts, gens, answers, votes, logprobs, scores):
            if not a:
                out.append(Generation(p, g.completions, g.answer, g.agreement, g.extra))
                continue
            lp = lp or [0.0] * len(a)
            best = max(range(len(a)), key=lambda i: (_finite(s[i]), v[i], _finite(lp[i]), -i))
            info = {"select_by": select_by, "scores": [None if math.isnan(x) else x for x in s], "chosen": best}
            out.append(Generation(p, g.completions, a[best], v[best], {**g.extra, "best_of_n": info}))
        tally(ctx, self.name, prompts=len(prompts), sequences_sampled=sum(len(g.completions) for g in gens), scored=scored)
        return out

    @staticmethod
    def logprobs(gen: Generation) -> list[float] | None:
        lp = (gen.extra.get("sampling") or {}).get("logprobs")
        return list(lp) if lp and len(lp) == len(gen.completions) else None

    def critic_scores(self, ctx, generate, prompts, gens, answers) -> tuple[list[list[float]], int]:
        """A critic's score of every sample, checking each distinct (prompt, answer) once."""
        keys = sorted({(i, a) for i, row in enumerate(answers) for a in row})
        tps = [task_prompt(prompts[i]) for i, _ in keys]
        found, _ = self.critic.score(ctx, generate, tps, [a for _, a in keys], [gens[i].completions for i, _ in keys])
        by_key = dict(zip(keys, found))
        return [[by_key[(i, a)] for a in row] for i, row in enumerate(answers)], len(keys)


def _finite(x: float) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


@hookimpl
def selfloop_register_refiners(register):
    register(BestOfN)
