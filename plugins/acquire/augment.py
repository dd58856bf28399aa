"""Augmentation: new rows made from existing prompts, then labelled by the model.

Two ways to make a new prompt from an existing one (survey section 03, "data augmentation
and expansion"):

- ``perturb`` (rule-based, verifiable tasks): the task's ``perturb(problem, rng) -> Problem``
  edits the prompt (reversal: substitute, swap, insert or delete a character; addition:
  change a digit or lengthen an operand) and computes the new problem's reference itself,
  so the row stays checkable (meta-evaluation only: the core strips references before
  filters and optimizers). Its difficulty is the task's level of the new problem.
- ``paraphrase`` (free text): the model rewrites the prompt following
  ``paraphrase_template`` (a prompted rewrite, as in back-translation/paraphrase
  augmentation). A rewrite may drift in meaning, so it carries no reference (label
  precision leaves it out); its difficulty is the original's.

The existing prompts are by default those the run trained on in earlier promoted rounds
(``origin=history``: the bootstrap's and later kept rows) at the curriculum's levels, or
fresh task samples (``origin=task``). Each row's source is ``acquire/augment/<mode>``; the
id and prompt it came from are in the stage's ``artifacts/augment/provenance.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Acquirer, Problem
from selfloop_plugins.acquire.self_instruct import NearCopyIndex, context_limit, label_prompts, reads_only_alphabet, sampling_fields

TEMPLATE = "Rewrite the following task in different words, keeping its meaning and its answer.\nTask: {prompt}\nRewritten task:"


@dataclass
class AugmentConfig:
    n_problems: int = 200  # new rows per round
    mode: str = "auto"  # perturb | paraphrase | both | auto (perturb if the task offers it, else paraphrase)
    origin: str = "history"  # history: prompts trained on in earlier rounds | task: sampled at the levels
    level_offsets: list[int] = field(default_factory=lambda: [-1, 0])  # origin levels: ctx.level + offsets
    paraphrase_template: str = TEMPLATE
    temperature: float = 0.7  # paraphrase sampling
    # a rewrite's word ROUGE-L to its original must lie in [min_similarity, max_similarity)
    min_similarity: float = 0.2
    max_similarity: float = 0.9
    max_attempts: int = 3  # tries per wanted row before giving up (duplicates, failed rewrites)
    batch_size: int = 64

    def __post_init__(self):
        for name in ("n_problems", "max_attempts", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "an integer >= 1")
        for name, accepted in (("mode", ("auto", "perturb", "paraphrase", "both")), ("origin", ("history", "task"))):
            if getattr(self, name) not in accepted:
                raise OptionError(name, getattr(self, name), " | ".join(accepted))
        if "{prompt}" not in self.paraphrase_template:
            raise OptionError("paraphrase_template", self.paraphrase_template, "a template containing {prompt}")
        if not 0 <= self.min_similarity < self.max_similarity <= 1:
            raise OptionError("min_similarity", self.min_similarity, f"a number in [0, max_similarity={self.max_similarity}) (and max_similarity <= 1)")
        if self.temperature < 0:
            raise OptionError("temperature", self.temperature, "a number >= 0")


class Augment(Acquirer):
    name = "augment"
    Config = AugmentConfig

    def modes(self, task) -> list[str]:
        mode = self.config.mode
        if mode == "auto":
            return ["perturb"] if callable(getattr(task, "perturb", None)) else ["paraphrase"]
        return ["perturb", "paraphrase"] if mode == "both" else [mode]

    def setup(self, ctx):
        task, modes = ctx.task, self.modes(ctx.task)
        if "perturb" in modes and not callable(getattr(task, "perturb", None)):
            raise SelfloopError(
                f"acquire 'augment' mode={self.config.mode} needs task {task.name!r} to offer perturb(problem, rng) -> Problem, "
                f"and it does not; use acquire.augment.mode=paraphrase (free-text tasks) or add perturb to the task (docs/acquire.md)"
            )
        if "paraphrase" in modes and reads_only_alphabet(ctx):
            missing = sorted(set(self.config.paraphrase_template.replace("{prompt}", "")) - set(task.alphabet))
            if missing:
                raise SelfloopError(
                    f"acquire 'augment' mode={self.config.mode} asks the model to paraphrase, but model 'tiny' reads only task "
                    f"{task.name!r}'s alphabet, which lacks the template's characters {''.join(missing)!r}; "
                    f"use mode=perturb" + ("" if callable(getattr(task, "perturb", None)) else " with a task that offers perturb")
                )

    def originals(self, ctx) -> list[tuple[str, Problem]]:
        """(id, problem) pairs to augment: trained-on rows at the curriculum's levels, or task samples."""
        c, task = self.config, ctx.task
        levels = [ctx.level + o for o in c.level_offsets if ctx.level + o in task.levels] or [ctx.level]
        if c.origin == "history":
            history = ctx.training_history()
            if len(history):
                import numpy as np

                difficulty = np.asarray(history["difficulty"])
                chosen = np.flatnonzero(np.isin(difficulty, levels))
                if not len(chosen):
                    top = int(difficulty.max())
                    ctx.warn(self.name, f"no trained-on prompts at levels {levels}; augmenting those of level {top}")
                    chosen = np.flatnonzero(difficulty == top)
                rows = history.select(chosen)
                return [(i, Problem(p, None, d)) for i, p, d in zip(rows["id"], rows["prompt"], rows["difficulty"])]
            ctx.warn(self.name, "no trained-on prompts yet (origin=history); augmenting prompts sampled from the task")
        per_level = -(-c.n_problems // len(levels))
        return [(f"task-L{level}-{i}", p) for level in levels for i, p in enumerate(task.sample(ctx.rng, level, per_level))]

    def acquire(self, ctx):
        from selfloop.data import make_rows

        c, task = self.config, ctx.task
        self.setup(ctx)
        originals = self.originals(ctx)
        if not originals:
            raise SelfloopError(f"acquire 'augment' found no prompts to augment (origin={c.origin}, level {ctx.level})")
        modes = self.modes(task)
        wanted = {m: c.n_problems // len(modes) + (i < c.n_problems % len(modes)) for i, m in enumerate(modes)}
        seen = {p.prompt for _, p in originals}
        rejected: Counter = Counter()
        made: list[tuple[str, Problem, str, Problem]] = []  # (parent id, parent, mode, new problem)
        for mode in modes:
            make = self.perturbed if mode == "perturb" else self.paraphrased
            made += make(ctx, originals, wanted[mode], seen, rejected)
        ctx.record(self.name, originals=len(originals), made=dict(Counter(m for _, _, m, _ in made)), rejected=dict(rejected))
        if not made:
            ctx.warn(self.name, f"made no new prompt from {len(originals)} originals (rejected: {dict(rejected)})")
            return make_rows([])
        if len(made) < c.n_problems:
            ctx.warn(self.name, f"made {len(made)} of n_problems={c.n_problems} new prompts (rejected: {dict(rejected)})")

        gens = label_prompts(ctx, [p.prompt for *_, p in made], [p.difficulty for *_, p in made], c.batch_size, f"label round {ctx.round}")
        rows, lines = [], []
        for i, ((parent_id, parent, mode, problem), gen) in enumerate(zip(made, gens)):
            row_id = f"r{ctx.round:03d}-{self.name}-{i}"
            rows.append(dict(id=row_id, prompt=problem.prompt, completions=gen.completions, answer=gen.answer, reference=problem.reference,
                             difficulty=problem.difficulty, round=ctx.round, source=f"acquire/{self.name}/{mode}", **sampling_fields(gen)))
            lines.append(json.dumps({"id": row_id, "mode": mode, "from_id": parent_id, "from_prompt": parent.prompt}))
        ctx.save_artifact(self.name, "provenance.jsonl", "\n".join(lines) + "\n")
        return make_rows(rows)

    def _parents(self, ctx, originals, count):
        """``count`` originals in random order, cycling when there are fewer."""
        order = list(range(len(originals)))
        ctx.rng.shuffle(order)
        return [originals[order[k % len(order)]] for k in range(count)]

    def perturbed(self, ctx, originals, n, seen, rejected):
        task, out = ctx.task, []
        levels = set(task.levels)
        for parent_id, parent in self._parents(ctx, originals, n * self.config.max_attempts):
            if len(out) == n:
                break
            try:
                new = task.perturb(parent, ctx.rng)
            except ValueError as exc:  # a prompt the task cannot parse
                ctx.row_error(self.name, parent_id, f"perturb failed: {exc}")
                rejected["perturb_failed"] += 1
                continue
            if not isinstance(new, Problem):
                raise SelfloopError(f"task {task.name!r}'s perturb returned {type(new).__name__}; expected a selfloop.strategy.Problem")
            if new.difficulty not in levels:
                rejected["level"] += 1
            elif new.prompt in seen:
                rejected["duplicate"] += 1
            else:
                seen.add(new.prompt)
                out.append((parent_id, parent, "perturb", new))
        return out

    def paraphrased(self, ctx, originals, n, seen, rejected):
        from selfloop.progress import progress

        c, out = self.config, []
        limit = context_limit(ctx.model)
        parents = []
        for parent_id, parent in self._parents(ctx, originals, n * c.max_attempts):
            ask = c.paraphrase_template.replace("{prompt}", parent.prompt)
            if limit is not None and len(ask) + 2 * len(parent.prompt) + 2 > limit:
                rejected["too_long"] += 1  # the request and its rewrite would not fit the model's context
            else:
                parents.append((parent_id, parent, ask))
        with progress(total=n, desc=f"paraphrase round {ctx.round}", unit="prompt") as bar:
            for start in range(0, len(parents), c.batch_size):
                if len(out) >= n:
                    break
                chunk = parents[start : start + c.batch_size]
                max_new = 2 * max(len(p.prompt) for _, p, _ in chunk)
                if limit is not None:  # the longest request plus its rewrite fits the context
                    max_new = max(1, min(max_new, limit - max(len(ask) for *_, ask in chunk) - 2))
                texts = ctx.model.generate([ask for *_, ask in chunk], n=1, temperature=c.temperature, max_new_tokens=max_new)
                for (parent_id, parent, _), outs in zip(chunk, texts):
                    text = (outs[0] if outs else "").strip().split("\n\n")[0].strip()
                    reason = self._paraphrase_rejected(ctx.task, text, parent.prompt, seen)
                    if reason:
                        rejected[reason] += 1
                    elif len(out) < n:
                        seen.add(text)
                        out.append((parent_id, parent, "paraphrase", Problem(text, None, parent.difficulty)))
                        bar.update(1)
        return out

    def _paraphrase_rejected(self, task, text: str, original: str, seen: set) -> str | None:
        """Why a rewrite is refused, or None: empty, outside the alphabet, a copy, a length
        outside [1/2, 2] x the original's, or word ROUGE-L to the original outside
        [min_similarity, max_similarity) (unrelated text, or a near-copy)."""
        c = self.config
        if not text:
            return "empty"
        if task.alphabet and not set(text) <= set(task.alphabet):
            return "alphabet"
        if text in seen or " ".join(text.lower().split()) == " ".join(original.lower().split()):
            return "duplicate"
        if not len(original) / 2 <= len(text) <= 2 * len(original):
            return "length"
        index = NearCopyIndex("word", "rouge_l")
        index.add(original)
        similarity = index.max_similarity(text)
        if similarity < c.min_similarity:
            return "unrelated"
        if similarity >= c.max_similarity:
            return "near_copy"
        return None


@hookimpl
def selfloop_register_acquirers(register):
    register(Augment)
