"""Chain of thought: prompt for reasoning steps, then separate the steps from the answer.

Follows zero-shot chain-of-thought prompting (Kojima et al. 2022, "Large Language Models are
Zero-Shot Reasoners": "Let's think step by step", with an optional second pass that asks for
the answer) and few-shot chain of thought (Wei et al. 2022: put worked examples in the
template). Each prompt is templated before the inner layer generates; each completion is
parsed after: the text after the last ``answer_marker`` is the answer, the text before it the
rationale. The returned ``completions`` are the parsed answers, so everything outside this
layer (voting, critics, filters, the acquirer) sees answers; the rationales stay aligned with
them in ``extra["cot"]["rationales"]`` for training (e.g. STaR, Zelikman et al. 2022: fine-tune
on ``template(prompt) -> rationale + marker + answer`` for rows whose answer the filters kept).

A character-level ``tiny`` model reads template characters outside its task's alphabet as
``<unk>`` and was trained on bare prompts: ``setup`` refuses that combination.

This module also holds what the refiners share: which task prompt a wrapped prompt came from
(``task_prompt``), characters a char-level model cannot read, and counters in the stage notes.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Generation, Refiner
from selfloop_plugins.refine.self_consistency import majority

ON_MISSING = ("last_line", "ask", "empty")
# fewer new tokens than this leave no room for reasoning before the answer (setup warns)
MIN_REASONING_TOKENS = 64

# wrapped prompt -> the task's prompt it wraps, while an outer layer's call is in flight
_ORIGINAL: dict[str, str] = {}


def task_prompt(prompt: str) -> str:
    """The task's own prompt behind a prompt an outer refiner wrapped (a template, retrieved
    passages), for what needs the task's format: ``inverse``, ``is_well_formed``, rows."""
    return _ORIGINAL.get(prompt, prompt)


@contextlib.contextmanager
def wrapping(wrapped: list[str], originals: list[str]) -> Iterator[None]:
    """Remember which task prompt each wrapped prompt stands for while inner layers run."""
    saved = {w: _ORIGINAL[w] for w in wrapped if w in _ORIGINAL}
    for w, o in zip(wrapped, originals):
        if w != o:
            _ORIGINAL[w] = task_prompt(o)
    try:
        yield
    finally:
        for w in wrapped:
            _ORIGINAL.pop(w, None)
        _ORIGINAL.update(saved)


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed in an override (Hydra keeps them literal) become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced in one pass (a value that
    contains ``{answer}`` stays as it is) and other braces left alone."""
    pattern = "|".join(re.escape(k) for k in values)
    return re.sub(rf"\{{({pattern})\}}", lambda m: values[m.group(1)], unescape(template))


def literal_part(template: str, *names: str) -> str:
    """The template's own characters, without its placeholders (what a model must read)."""
    return fill(template, **{n: "" for n in names})


def tally(ctx, strategy: str, **counts: float) -> None:
    """Add counts to the stage's ``notes.<strategy>`` (a refiner is called many times a stage)."""
    notes = ctx.notes.get(strategy, {})
    ctx.record(strategy, **{k: notes.get(k, 0) + v for k, v in counts.items()})


def unreadable_characters(ctx, text: str) -> list[str]:
    """Characters of ``text`` that the run's ``tiny`` model cannot read (its character
    tokenizer covers the task's alphabet only); none for other models or free-text tasks."""
    providers = ctx.strategies.get("model") or []
    alphabet = getattr(ctx.task, "alphabet", None)
    if not alphabet or not any(getattr(p, "name", "") == "tiny" for p in providers):
        return []
    return sorted(set(text) - set(alphabet))


def refuse_unreadable(ctx, owner: str, option: str, text: str) -> None:
    """Setup check: a prompt template the run's char-level model cannot read is useless."""
    missing = unreadable_characters(ctx, text)
    if missing:
        raise SelfloopError(
            f"refine '{owner}' cannot work here: its {option} uses characters {missing} outside task {ctx.task.name!r}'s "
            f"alphabet, which model 'tiny' (a character tokenizer of that alphabet, trained on bare prompts) reads as <unk>; "
            f"use a model that reads free text (model=pretrained) or a {option} of the alphabet's characters"
        )


@dataclass
class CotConfig:
    # "{prompt}" is replaced by the task's prompt (no other braces are interpreted; a typed
    # \n is a newline); put worked examples before it for few-shot chain of thought
    template: str = "Q: {prompt}\nA: Let's think step by step.\n"
    # the answer is the text after the last occurrence of this marker (its first line)
    answer_marker: str = "Answer:"
    # a completion without the marker: its last line is the answer (last_line), ask the model
    # for the answer after its reasoning (ask: Kojima et al.'s second pass), or no answer (empty)
    on_missing: str = "last_line"
    # the second pass's prompt, appended to the templated prompt and the reasoning
    answer_prompt: str = "\nTherefore, the answer is"
    # new tokens for the reasoning and the answer (null: the caller's bound, i.e. the task's
    # answer bound, which leaves no room to reason on tasks with short answers)
    max_new_tokens: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", self.max_new_tokens, "null or an integer >= 1")
        if "{prompt}" not in self.template:
            raise OptionError("template", self.template, "a template containing {prompt}")
        if not self.answer_marker.strip():
            raise OptionError("answer_marker", self.answer_marker, "a non-blank string, e.g. 'Answer:'")
        if self.on_missing not in ON_MISSING:
            raise OptionError("on_missing", self.on_missing, ", ".join(ON_MISSING))


@dataclass
class Parsed:
    rationale: str
    answer_text: str
    marked: bool


def parse(completion: str, marker: str) -> Parsed:
    """Split a completion at the last ``marker``: (rationale, the answer's first line)."""
    head, sep, tail = completion.rpartition(marker)
    if sep:
        lines = tail.strip().splitlines()
        return Parsed(head.strip(), _clean(lines[0]) if lines else "", True)
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return Parsed("", "", False)
    return Parsed("\n".join(lines[:-1]).strip(), _clean(lines[-1]), False)


def _clean(text: str) -> str:
    # "... the answer is 42." -> "42": a sentence's full stop is not part of the answer
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def training_pair(cot: dict, answer: str) -> tuple[str, str] | None:
    """What a rationale-keeping optimizer trains on (STaR): the templated prompt and the
    first rationale that led to ``answer`` (the row's kept label), ending in the marker and
    the answer; None when no marked completion gave that answer."""
    for rationale, marked, answer_of in zip(cot["rationales"], cot["marked"], cot.get("answers", [])):
        if marked and answer_of == answer:
            return cot["prompt"], f"{rationale}\n{cot['marker']} {answer}".lstrip("\n")
    return None


class Cot(Refiner):
    name = "cot"
    Config = CotConfig

    def setup(self, ctx):
        c = self.config
        refuse_unreadable(ctx, self.name, "template", literal_part(c.template, "prompt") + unescape(c.answer_marker))
        budget = max(ctx.task.max_new_tokens(level) for level in ctx.task.levels)
        if c.max_new_tokens is None and budget < MIN_REASONING_TOKENS:
            # the chain generates at most the caller's max_new_tokens: the task's answer bound
            ctx.warn(self.name, f"task {ctx.task.name!r} bounds generation at {budget} new tokens (its max_new_tokens), which "
                                f"is also the budget of the reasoning: rationales longer than that are cut before the answer marker "
                                f"(set refine.cot.max_new_tokens)")

    def refine(self, ctx, prompts, generate):
        if not prompts:
            return []
        c = self.config
        templated = [fill(c.template, prompt=p) for p in prompts]
        with wrapping(templated, prompts):
            room = {"max_new_tokens": c.max_new_tokens} if c.max_new_tokens is not None else {}
            gens = generate(templated, **room)
        marker = unescape(c.answer_marker)
        parsed = [[parse(x, marker) for x in g.completions] for g in gens]
        missing = [(i, j) for i, ps in enumerate(parsed) for j, p in enumerate(ps) if not p.marked]
        asked = self.second_pass(generate, prompts, templated, gens, missing) if c.on_missing == "ask" else {}
        out = []
        for i, (p, g, ps) in enumerate(zip(prompts, gens, parsed)):
            answers = []
            for j, x in enumerate(ps):
                text = asked.get((i, j), x.answer_text) if x.marked or c.on_missing != "empty" else ""
                answers.append(ctx.task.extract_answer(text) if text else "")
            chosen = self.chosen_answer(ctx, g, answers)
            agreement = None if g.agreement is None else (answers.count(chosen) / len(answers) if answers else 0.0)
            cot = {"prompt": templated[i], "marker": marker, "rationales": [x.rationale for x in ps],
                   "raw": list(g.completions), "marked": [x.marked for x in ps], "answers": answers}
            out.append(Generation(p, answers, chosen, agreement, {**g.extra, "cot": cot}))
        total = sum(len(ps) for ps in parsed)
        tally(ctx, self.name, completions=total, missing_marker=len(missing), second_pass=len(asked))
        if total and len(missing) > total / 2:
            ctx.warn(self.name, f"{len(missing)} of {total} completions lack the answer marker {c.answer_marker!r}: "
                                f"the model does not follow the chain-of-thought format (was it trained or prompted for it?)")
        return out

    def chosen_answer(self, ctx, gen: Generation, answers: list[str]) -> str:
        """The inner layer's choice, in parsed form (cot innermost: one completion, or the
        completion whose raw answer the inner layer picked); else the majority."""
        raw = [ctx.task.extract_answer(x) for x in gen.completions]
        if gen.answer in raw:
            return answers[raw.index(gen.answer)]
        parsed = parse(gen.answer, unescape(self.config.answer_marker))
        if parsed.marked:
            return ctx.task.extract_answer(parsed.answer_text)
        return majority(answers)[0]

    def second_pass(self, generate, prompts, templated, gens, missing) -> dict[tuple[int, int], str]:
        """Kojima et al.'s answer extraction: templated prompt + reasoning + answer prompt."""
        if not missing:
            return {}
        c = self.config
        questions = [templated[i] + gens[i].completions[j] + unescape(c.answer_prompt) for i, j in missing]
        with wrapping(questions, [prompts[i] for i, _ in missing]):
            replies = generate(questions, n=1, temperature=0.0)
        return {key: parse(r.completions[0] if r.completions else "", unescape(c.answer_marker)).answer_text for key, r in zip(missing, replies)}


@hookimpl
def selfloop_register_refiners(register):
    register(Cot)
