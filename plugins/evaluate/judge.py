"""LLM-as-a-judge: a model grades answers with a rubric prompt.

The judge is the model under evaluation itself (``model: self``, self-rewarding as in Yuan
et al. 2024) or another model (``model: bootstrap``, ``round:N``, ``previous`` or a local
path, loaded with ``ctx.load_model``), prompted with ``rubric`` (fields ``{prompt}``,
``{answer}``, ``{scale}``) as in Zheng et al. 2023 ("Judging LLM-as-a-Judge with MT-Bench").
The judgement is parsed robustly — a fraction (``7/10``, ``7 out of 10``), a percentage, a
verdict word (yes/no, correct/incorrect, pass/fail, true/false) or a number on ``0..scale``
— into a score in [0, 1]. An output that cannot be parsed is recorded per row
(``ctx.row_error``: the stage's ``row_errors.jsonl``, counted in its metrics) and left out
of the mean, never scored 0; when more than ``loop.max_row_error_share`` of the judgements
cannot be parsed the evaluator fails with a message saying so.

A tiny character-level model (``model=tiny``) cannot read a rubric — its vocabulary is the
task's alphabet — so ``model: self`` (or any of the run's own models) is refused with
``model=tiny``; point ``model`` at an instruction-following model's directory.

Cost per model and level: ``n_per_level`` greedy answers plus ``n_per_level`` judge
generations of up to ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Evaluator
from selfloop_plugins.evaluate.multi import fixed_problems

DEFAULT_RUBRIC = (
    "You are grading an answer.\nQuestion: {prompt}\nAnswer: {answer}\n"
    "Is the answer correct and complete? Reply with a score from 0 to {scale}.\nScore:"
)
RUN_MODELS = ("self", "incumbent", "bootstrap", "previous")

_NUMBER = r"(\d+(?:\.\d+)?)"
_FRACTION = re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}")
_PERCENT = re.compile(rf"{_NUMBER}\s*%")
_YES = re.compile(r"^\W*(yes|correct|true|pass|passed|right|good)\b")
_NO = re.compile(r"^\W*(no|incorrect|false|fail|failed|wrong|bad)\b")
_SIGNED = re.compile(r"-?\d+(?:\.\d+)?")
_HEDGE = re.compile(r"\b(no idea|not sure|unsure|don'?t know|do not know|cannot|can'?t|unclear)\b")


def parse_judgement(text: str, scale: float) -> tuple[float | None, str]:
    """A judge's output as a score in [0, 1], or (None, why it could not be parsed)."""
    t = text.strip().lower()
    if not t:
        return None, "empty judgement"
    if _HEDGE.search(t):
        return None, f"no verdict (hedged): {text.strip()[:60]!r}"
    m = _FRACTION.search(t)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        return (num / den, "") if 0 < den and num <= den else (None, f"fraction out of range: {m.group(0)!r}")
    m = _PERCENT.search(t)
    if m:
        v = float(m.group(1))
        return (v / 100, "") if v <= 100 else (None, f"percentage out of range: {m.group(0)!r}")
    if _YES.search(t):
        return 1.0, ""
    if _NO.search(t):
        return 0.0, ""
    m = _SIGNED.search(t)
    if m:
        v = float(m.group(0))
        return (v / scale, "") if 0 <= v <= scale else (None, f"number {m.group(0)} outside 0..{scale:g}")
    return None, f"no score, fraction, percentage or verdict in {text.strip()[:60]!r}"


@dataclass
class JudgeConfig:
    # who judges: self (the model evaluated), incumbent, bootstrap, previous, round:N, or a path
    model: str = "self"
    rubric: str = DEFAULT_RUBRIC
    scale: float = 10.0
    n_per_level: int = 16
    max_new_tokens: int = 16

    def __post_init__(self):
        if not self.model:
            raise OptionError("model", self.model, "self, incumbent, bootstrap, previous, round:N or a model directory")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.rubric) if f is not None}
        if "answer" not in fields or not fields <= {"prompt", "answer", "scale"}:
            raise OptionError("rubric", self.rubric, "a template with {answer} (and optionally {prompt}, {scale}), no other {fields}")
        for option, ok, accepted in (
            ("scale", math.isfinite(self.scale) and self.scale > 0, "a number > 0"),
            ("n_per_level", self.n_per_level >= 1, "an integer >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
        ):
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)


class Judge(Evaluator):
    name = "judge"
    Config = JudgeConfig
    uses_references = False

    def __init__(self, config=None):
        super().__init__(config)
        self._loaded = None

    def setup(self, ctx):
        source = self.config.model
        own = source in RUN_MODELS or source.startswith("round:")
        providers = [m.name for m in ctx.strategies.get("model", [])]
        if own and "tiny" in providers:
            raise OptionError("model", source, "a directory of a model that follows instructions: the run's model 'tiny' is character-level over "
                              f"the task's alphabet {ctx.task.alphabet!r} and cannot read a rubric prompt")

    def grader(self, ctx, model):
        """The model that judges (``model``: the one being evaluated)."""
        source = self.config.model
        if source == "self":
            if model is None:
                raise SelfloopError("evaluate 'judge' (model=self) grades rows with the incumbent, and there is none yet")
            return model
        if self._loaded is None:
            self._loaded = ctx.load_model(source)
        return self._loaded

    def judge(self, ctx, grader, prompts: list[str], answers: list[str], row_ids: list[str]) -> list[float | None]:
        """One score in [0, 1] per answer; None (recorded with ctx.row_error) when the
        judgement cannot be parsed. Fails past loop.max_row_error_share."""
        c = self.config
        if not prompts:
            return []
        asks = [c.rubric.format(prompt=p, answer=a, scale=f"{c.scale:g}") for p, a in zip(prompts, answers)]
        outs = grader.generate(asks, max_new_tokens=c.max_new_tokens)
        scores, failed = [], []
        for row_id, out in zip(row_ids, outs):
            value, why = parse_judgement(out[0], c.scale)
            scores.append(value)
            if value is None:
                ctx.row_error(self.name, row_id, f"unparseable judgement: {why}")
                failed.append(why)
        ctx.record(self.name, judged=ctx.notes.get(self.name, {}).get("judged", 0) + len(scores),
                   unparseable=ctx.notes.get(self.name, {}).get("unparseable", 0) + len(failed))
        limit = ctx.run.loop.max_row_error_share
        if failed and len(failed) / len(scores) > limit:
            raise SelfloopError(
                f"evaluate 'judge': {len(failed)} of {len(scores)} judgements could not be parsed (more than "
                f"loop.max_row_error_share={limit}), e.g. {failed[0]}; the judge model ({c.model}) does not follow the rubric"
            )
        return scores

    def score(self, ctx, data):
        """The judge's score per row (NaN, recorded as a row error, where unparseable); the
        judge is ``ctx.model`` (the incumbent) for ``model: self``."""
        grader = self.grader(ctx, ctx.model)
        scores = self.judge(ctx, grader, list(data["prompt"]), list(data["answer"]), list(data["id"]))
        return [float("nan") if s is None else s for s in scores]

    def evaluate(self, ctx, model):
        c = self.config
        grader = self.grader(ctx, model)
        by_level, skipped = {}, []
        for level in ctx.eval_levels:
            prompts = [p.prompt for p in fixed_problems(ctx, self.name, level, c.n_per_level)]
            answers = [ctx.task.extract_answer(o[0]) for o in model.generate(prompts, max_new_tokens=ctx.task.max_new_tokens(level))]
            scores = [s for s in self.judge(ctx, grader, prompts, answers, [f"{self.name}-L{level}-{i}" for i in range(len(prompts))]) if s is not None]
            if scores:
                by_level[str(level)] = sum(scores) / len(scores)
            else:
                skipped.append(level)
        if skipped:
            ctx.warn(self.name, f"no judgement could be parsed at level(s) {skipped}: left out of by_level")
        if not by_level:
            raise SelfloopError("evaluate 'judge': no judgement could be parsed at any level")
        return {"score": sum(by_level.values()) / len(by_level), "by_level": by_level}


@hookimpl
def selfloop_register_evaluators(register):
    register(Judge)
