"""Self-correction: generate, critique, revise, for a bounded number of turns.

Follows Self-Refine (Madaan et al. 2023): the first answer is critiqued; while the critic
rejects it, the answer is revised and critiqued again, at most ``max_turns`` times. An answer
the critic passes is never touched. The critic is one of

- ``roundtrip``: the model answers the task's inverse question about the answer (reversal:
  reverse the answer back) and passes it when it gets the input back. Label-free, one greedy
  generation per check, and it catches the consistent errors that voting lets through (a wrong
  answer survives only if the model makes the mirror-image mistake). Tasks with ``inverse``.
- ``well_formed``: the task's label-free format check (reversal: right length and alphabet;
  addition: digits, operand length or one more). Free, but blind to wrong digits.
- ``model``: the model itself, prompted with ``critique_template`` ("... Reply yes or no");
  the reply is parsed for a yes/no verdict. Needs a model that follows instructions: a
  character-level ``tiny`` model cannot read the template (setup refuses it).
- the name of any configured label-free evaluator: its per-row ``score`` >= ``threshold``
  passes (rows built with ``selfloop.data.make_rows``: prompt, the samples behind the answer
  under review as ``completions``, the answer). ``self_consistency`` as critic rejects answers
  the samples do not agree on.

Revisions: ``resample`` draws ``samples_per_turn`` answers from the inner layer at
``temperature`` and takes the most frequent one not yet rejected (what a model that cannot
read feedback can do: rejection sampling guided by the critic); ``prompt`` asks the model to
revise with ``revise_template`` (the critique included), as Self-Refine does. When no answer
passes within the limit the best-scored one is kept (ties: the earliest, so a binary critic
that rejects everything leaves the first answer), and the row counts as ``hit_turn_limit``.

The trace of every row is in ``extra["self_correction"]``: the critiques (answer, score,
verdict, text), the revisions, the turns taken and whether the limit was hit.

Cost per prompt: one critique per turn (``roundtrip``/``model``: one greedy generation;
an evaluator: its ``score`` cost) plus ``samples_per_turn`` sequences per revision.

For addition (no inverse) the useful label-free critics are ``well_formed`` (cheap, weak) and
an agreement evaluator; a metamorphic check (``a+b`` against ``b+a``) would need the task to
offer equivalent prompts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import ContractError, OptionError
from selfloop.strategy import Generation, Refiner
from selfloop_plugins.filter.uncertainty import agreement
from selfloop_plugins.refine.cot import fill, literal_part, refuse_unreadable, tally, task_prompt, wrapping

BUILTIN_CRITICS = ("roundtrip", "well_formed", "model")
REVISIONS = ("resample", "prompt")

_YES = re.compile(r"\b(yes|correct|right|true|pass(es|ed)?)\b", re.IGNORECASE)
_NO = re.compile(r"\b(no|not|incorrect|wrong|false|fail(s|ed)?)\b", re.IGNORECASE)


def check_critic(ctx, owner: str, critic: str, option: str = "critic") -> None:
    """Setup check of a critic name: built in and usable here, or a configured label-free
    evaluator (the error lists the configured ones)."""
    if critic == "roundtrip":
        if not callable(getattr(ctx.task, "inverse", None)):
            raise OptionError(option, critic, f"a critic task {ctx.task.name!r} supports: it has no inverse(prompt, answer), so "
                                              f"use well_formed, model or a configured evaluator")
        return
    if critic in BUILTIN_CRITICS:
        return
    evaluators = ctx.strategies.get("evaluate", [])
    names = [e.name for e in evaluators]
    if critic not in names:
        raise OptionError(option, critic, f"one of {', '.join(BUILTIN_CRITICS)} or a configured evaluator "
                                          f"(configured: {', '.join(names) or 'none'})")
    if getattr(ctx.strategy("evaluate", critic), "uses_references", False):
        raise OptionError(option, critic, f"a label-free evaluator: {critic!r} reads references (meta-evaluation only), "
                                          f"and refiners run on unlabelled prompts")


class Critic:
    """Scores answers in [0, 1] (NaN: no verdict), label-free. ``generate`` is the inner layer."""

    def __init__(self, owner: str, name: str, template: str = ""):
        self.owner, self.name, self.template = owner, name, template
        self.busy = False  # an evaluator that generates through the chain must not re-enter it

    def score(self, ctx, generate, prompts: list[str], answers: list[str], completions: list[list[str]]) -> tuple[list[float], list[str]]:
        """One (score, critique text) per answer; prompts are task prompts."""
        if not prompts:
            return [], []
        self.busy = True
        try:
            if self.name == "well_formed":
                scores = [float(ctx.task.is_well_formed(p, a)) for p, a in zip(prompts, answers)]
                return scores, ["well formed" if s else "not well formed" for s in scores]
            if self.name == "roundtrip":
                return self.roundtrip(ctx, generate, prompts, answers)
            if self.name == "model":
                return self.ask_model(generate, prompts, answers)
            return self.evaluator(ctx, prompts, answers, completions)
        finally:
            self.busy = False

    def roundtrip(self, ctx, generate, prompts, answers):
        questions = [ctx.task.inverse(p, a) for p, a in zip(prompts, answers)]
        asked = [i for i, q in enumerate(questions) if q is not None]
        scores, texts = [math.nan] * len(prompts), ["the task cannot invert this answer"] * len(prompts)
        replies = generate([questions[i][0] for i in asked], n=1, temperature=0.0) if asked else []
        for i, reply in zip(asked, replies):
            ok = reply.answer == questions[i][1]
            scores[i] = float(ok)
            texts[i] = f"inverse {questions[i][0]!r} -> {reply.answer!r}" + ("" if ok else f", expected {questions[i][1]!r}")
        return scores, texts

    def ask_model(self, generate, prompts, answers):
        questions = [fill(self.template, prompt=p, answer=a) for p, a in zip(prompts, answers)]
        with wrapping(questions, prompts):
            replies = generate(questions, n=1, temperature=0.0)
        texts = [r.completions[0] if r.completions else "" for r in replies]
        return [verdict(t) for t in texts], texts

    def evaluator(self, ctx, prompts, answers, completions):
        from selfloop.data import make_rows

        evaluator = ctx.strategy("evaluate", self.name)
        rows = make_rows(
            dict(id=f"{self.owner}-{i}", prompt=p, completions=c, answer=a, difficulty=ctx.level, round=ctx.round, source=f"refine/{self.owner}")
            for i, (p, a, c) in enumerate(zip(prompts, answers, completions))
        )
        scores = list(evaluator.score(ctx, rows))
        culprit = ctx.registry.describe("evaluate", self.name)
        if len(scores) != len(rows):
            raise ContractError(f"{culprit} score() returned {len(scores)} scores for {len(rows)} rows (critic of refine '{self.owner}')")
        bad = [s for s in scores if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s)]
        if bad:
            raise ContractError(f"{culprit} score() returned {bad[0]!r}; a critic of refine '{self.owner}' needs finite numbers")
        return [float(s) for s in scores], [f"{self.name} score {s:.3g}" for s in scores]


def verdict(reply: str) -> float:
    """1.0 for a yes, 0.0 for a no (whichever comes first), NaN when the reply has neither."""
    yes, no = _YES.search(reply), _NO.search(reply)
    if yes and (not no or yes.start() < no.start()):
        return 1.0
    return 0.0 if no else math.nan


@dataclass
class SelfCorrectionConfig:
    # roundtrip | well_formed | model | the name of a configured label-free evaluator
    critic: str = "roundtrip"
    # revisions at most; critiques at most max_turns + 1
    max_turns: int = 3
    # a critic score >= threshold passes (built-in critics score 0 or 1)
    threshold: float = 0.5
    # resample (draw new answers, take the most frequent not yet rejected) | prompt (ask for a revision)
    revise: str = "resample"
    samples_per_turn: int = 4
    temperature: float = 0.8
    # critic=model: {prompt} and {answer} are filled in (a typed \n is a newline); the reply must say yes or no
    critique_template: str = "Question: {prompt}\nProposed answer: {answer}\nIs the proposed answer correct? Reply yes or no.\nReply:"
    # revise=prompt: {prompt}, {answer} and {critique} are filled in
    revise_template: str = "Question: {prompt}\nA previous answer was {answer}; a reviewer said: {critique}\nCorrected answer:"

    def __post_init__(self):
        if not self.critic:
            raise OptionError("critic", self.critic, f"one of {', '.join(BUILTIN_CRITICS)} or a configured evaluator's name")
        if self.max_turns < 0:
            raise OptionError("max_turns", self.max_turns, "an integer >= 0 (0: critique only, never revise)")
        if not math.isfinite(self.threshold):
            raise OptionError("threshold", self.threshold, "a finite number")
        if self.revise not in REVISIONS:
            raise OptionError("revise", self.revise, ", ".join(REVISIONS))
        if self.samples_per_turn < 1:
            raise OptionError("samples_per_turn", self.samples_per_turn, "an integer >= 1")
        if self.temperature <= 0:
            raise OptionError("temperature", self.temperature, "a number > 0 (revisions are sampled)")
        for option in ("critique_template", "revise_template"):
            if "{prompt}" not in getattr(self, option) or "{answer}" not in getattr(self, option):
                raise OptionError(option, getattr(self, option), "a template containing {prompt} and {answer}")


@dataclass
class _Row:
    prompt: str  # the prompt as this layer received it
    task_prompt: str
    gen: Generation
    answer: str
    rejected: set
    critiques: list
    revisions: list
    completions: list = None  # the samples behind the current answer (what an agreement critic reads)
    passed: bool = False
    done: bool = False
    pending: bool = True  # an answer not critiqued yet


class SelfCorrection(Refiner):
    name = "self_correction"
    Config = SelfCorrectionConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.critic = Critic(self.name, self.config.critic, self.config.critique_template)

    def setup(self, ctx):
        c = self.config
        check_critic(ctx, self.name, c.critic)
        if c.critic == "model":
            refuse_unreadable(ctx, self.name, "critique_template", literal_part(c.critique_template, "prompt", "answer"))
        if c.revise == "prompt":
            refuse_unreadable(ctx, self.name, "revise_template", literal_part(c.revise_template, "prompt", "answer", "critique"))

    def refine(self, ctx, prompts, generate):
        if self.critic.busy:  # an evaluator critic generating through the chain: pass through
            return generate(prompts)
        if not prompts:
            return []
        c = self.config
        rows = [_Row(p, task_prompt(p), g, g.answer, set(), [], [], list(g.completions)) for p, g in zip(prompts, generate(prompts))]
        critiques = sequences = 0
        for turn in range(c.max_turns + 1):
            live = [r for r in rows if not r.done]
            if not live:
                break
            ask = [r for r in live if r.pending]  # a revision that found no new answer is not critiqued again
            scores, texts = self.critic.score(ctx, generate, [r.task_prompt for r in ask], [r.answer for r in ask], [r.completions for r in ask])
            critiques += len(ask)
            for r, s, t in zip(ask, scores, texts):
                r.pending = False
                r.passed = not math.isnan(s) and s >= c.threshold
                r.critiques.append({"answer": r.answer, "score": None if math.isnan(s) else s, "passed": r.passed, "text": t})
                if math.isnan(s):  # no verdict is no rejection: the answer stays
                    ctx.row_error(self.name, r.task_prompt, f"critic {c.critic!r} gave no verdict: {t!r}")
                r.done = r.passed or math.isnan(s)
                if not r.done:
                    r.rejected.add(r.answer)
            failing = [r for r in live if not r.done]
            if turn == c.max_turns or not failing:
                break
            sequences += self.revise(ctx, generate, failing)
        out = [self.finish(ctx, r) for r in rows]
        tally(ctx, self.name, prompts=len(rows), critiques=critiques, sequences_sampled=sequences,
              revised=sum(r.answer != r.gen.answer for r in rows),
              passed_first=sum(r.critiques[0]["passed"] for r in rows),
              passed_after_revision=sum(r.passed and len(r.critiques) > 1 for r in rows),
              hit_turn_limit=sum(not r.done for r in rows),
              no_verdict=sum(r.critiques[-1]["score"] is None for r in rows))
        return out

    def revise(self, ctx, generate, failing: list[_Row]) -> int:
        """Give each failing row a new answer to critique; returns the sequences drawn."""
        c = self.config
        if c.revise == "prompt":
            asks = [fill(c.revise_template, prompt=r.task_prompt, answer=r.answer, critique=r.critiques[-1]["text"]) for r in failing]
            with wrapping(asks, [r.prompt for r in failing]):
                gens = generate(asks, n=1, temperature=0.0)
            for r, g in zip(failing, gens):
                r.answer, r.pending, r.completions = g.answer, g.answer not in r.rejected, list(g.completions)
                r.revisions.append(g.answer)
            return len(failing)
        gens = generate([r.prompt for r in failing], n=c.samples_per_turn, temperature=c.temperature)
        drawn = 0
        for r, g in zip(failing, gens):
            drawn += len(g.completions)
            votes = Counter(ctx.task.extract_answer(x) for x in g.completions)
            fresh = [a for a, _ in votes.most_common() if a not in r.rejected]
            if g.answer not in r.rejected and g.answer not in fresh:
                fresh.insert(0, g.answer)
            if fresh:  # else every draw was rejected before: draw again next turn
                r.answer, r.pending, r.completions = fresh[0], True, list(g.completions)
            r.revisions.append(fresh[0] if fresh else None)
        return drawn

    def finish(self, ctx, r: _Row) -> Generation:
        answer = r.answer
        if not r.done:  # the turn limit: keep the best-scored answer, the earliest on ties
            scored = [(x["score"] if x["score"] is not None else -math.inf, -k, x["answer"]) for k, x in enumerate(r.critiques)]
            answer = max(scored)[2]
        r.answer = answer
        g = r.gen
        changed = answer != g.answer
        agree = g.agreement if not changed or g.agreement is None else agreement(ctx.task, g.completions, answer)
        trace = {"critic": self.config.critic, "turns": len(r.revisions), "critiques": r.critiques, "revisions": r.revisions,
                 "passed": r.passed, "hit_turn_limit": not r.done, "changed": changed}
        return Generation(r.prompt, g.completions, answer, agree, {**g.extra, "self_correction": trace})


@hookimpl
def selfloop_register_refiners(register):
    register(SelfCorrection)
