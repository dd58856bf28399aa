"""Iterative distillation: the teacher is a model plus test-time compute, the student learns
the teacher's outputs (sequence-level knowledge distillation, Kim & Rush 2016) with TRL's
SFTTrainer (through the ``sft`` optimizer, replay included).

Each round the teacher (``teacher``: the incumbent by default, or any model ``ctx.load_model``
accepts) answers the kept rows' prompts again through the configured refiners
(``relabel: true``; e.g. a majority vote of self-consistency samples), or its answers are the
rows' own (``relabel: false``: the acquirer already labelled them with the incumbent through
the refiners, at no extra cost). The targets are the teacher's answer (``targets: answer``)
or up to ``max_per_prompt`` of its samples that reach it (``targets: completions``, as ReST-EM
keeps several samples per problem). Targets below ``min_agreement`` or malformed are dropped.
Promoted, the student becomes the next round's teacher: iterated amplification and
distillation.

The student (``student``) continues from the incumbent, restarts from the bootstrap model
each round (``bootstrap``: STaR and ReST-EM restart from the base model), or is a new model
built by the run's model provider with ``student_model`` options changed (``fresh``, e.g.
``{n_layer: 2, n_embd: 64}``: a smaller student); once such a student was promoted, the
incumbent has its shape and later rounds continue from it.

``only_correct: true`` keeps only targets that match the reference (STaR's and ReST-EM's
filter): ground truth, so it runs only when the run sets
``loop.allow_references_in_training=true``, and the loop counts the labels.

Which process writes what: this optimizer writes nothing itself. Teacher generation and
student training run in the stage's process; the trainer keeps resumable checkpoints in
``ctx.checkpoint_dir``; the loop writes the returned student to ``round-NNN/optimize/model``
(with its own config, so a smaller student reloads as itself) and ``notes.distill`` to the
stage's metrics. Round 0 (labelled rows) trains with sft.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Optimizer
from selfloop_plugins.optimize._shared import check_bootstrap, check_range
from selfloop_plugins.optimize.sft import LR_SCHEDULERS

STUDENTS = ("incumbent", "bootstrap", "fresh")
TARGETS = ("answer", "completions")
RUN_MODELS = ("incumbent", "bootstrap", "previous")


@dataclass
class DistillConfig:
    # a ctx.load_model source: incumbent, bootstrap, previous, round:N, or a local model directory
    teacher: str = "incumbent"
    # the teacher answers again through the refiners; false: the rows' answers and completions
    relabel: bool = True
    targets: str = "answer"
    max_per_prompt: int = 4
    min_agreement: float = 0.0
    require_well_formed: bool = True
    # keep only targets matching the reference (STaR, ReST-EM): needs references allowed in training
    only_correct: bool = False
    student: str = "incumbent"
    # student=fresh: the run's model provider options to change, e.g. {n_layer: 2, n_embd: 64}
    student_model: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    # share of every batch replayed from earlier rounds (sft's mixture)
    replay_fraction: float = 0.25

    def __post_init__(self):
        check_range("teacher", self.teacher, bool(self.teacher), f"{', '.join(RUN_MODELS)}, round:N or a local model directory")
        check_range("targets", self.targets, self.targets in TARGETS, ", ".join(TARGETS))
        check_range("max_per_prompt", self.max_per_prompt, self.max_per_prompt >= 1, "an integer >= 1")
        check_range("min_agreement", self.min_agreement, 0 <= self.min_agreement <= 1, "a number in [0, 1]")
        check_range("student", self.student, self.student in STUDENTS, ", ".join(STUDENTS))
        check_range("student_model", self.student_model, not self.student_model or self.student == "fresh", "{} unless student=fresh")
        check_range("max_steps", self.max_steps, self.max_steps >= 1, "an integer >= 1")
        check_range("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        check_range("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0")
        check_range("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio <= 1, "a number in [0, 1]")
        check_range("replay_fraction", self.replay_fraction, 0 <= self.replay_fraction <= 1, "a number in [0, 1]")
        check_range("lr_scheduler", self.lr_scheduler, self.lr_scheduler in LR_SCHEDULERS, ", ".join(LR_SCHEDULERS))


def shapes(handle) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in handle.model.state_dict().items()}


class Distill(Optimizer):
    name = "distill"
    Config = DistillConfig

    def setup(self, ctx):
        c = self.config
        check_bootstrap(ctx, self.name)
        t = c.teacher
        if t not in RUN_MODELS and not (t.startswith("round:") and t[6:].isdigit()) and not Path(t).is_dir():
            raise OptionError("teacher", t, f"{', '.join(RUN_MODELS)}, round:N or an existing local model directory")
        if c.only_correct:
            if not getattr(ctx.task, "has_references", True):
                raise SelfloopError(f"optimize.distill.only_correct=true filters on references, and task {ctx.task.name!r} has none")
            if not ctx.run.loop.allow_references_in_training:
                raise SelfloopError(
                    "optimize.distill.only_correct=true keeps only answers that match the reference (STaR, ReST-EM): ground truth, so it "
                    "runs only when the run allows references in training: set loop.allow_references_in_training=true (every label is counted)"
                )
        if c.student == "fresh":
            self.student_config(ctx)

    # -- models ------------------------------------------------------------------------
    def student_config(self, ctx):
        """The run's model provider's Config with ``student_model`` applied."""
        (provider,) = ctx.strategies["model"]
        known = {f.name for f in dataclasses.fields(provider.config)}
        unknown = sorted(set(self.config.student_model) - known)
        if unknown:
            accepted = f"options of model {provider.name!r}: {', '.join(sorted(known))} (unknown: {', '.join(unknown)})"
            raise OptionError("student_model", dict(self.config.student_model), accepted)
        try:
            return dataclasses.replace(provider.config, **self.config.student_model)
        except OptionError as exc:
            raise OptionError(f"student_model.{exc.option}", exc.value, exc.accepted) from None

    def student(self, ctx):
        c = self.config
        if c.student == "incumbent":
            return ctx.model, "incumbent"
        if c.student == "bootstrap":
            return ctx.load_model("bootstrap"), "bootstrap (restarted)"
        (provider,) = ctx.strategies["model"]
        fresh = type(provider)(self.student_config(ctx)).build(ctx)
        if shapes(fresh) == shapes(ctx.model):
            return ctx.model, "incumbent (already the student's shape)"
        return fresh, f"fresh ({fresh.num_parameters} parameters; the incumbent has {ctx.model.num_parameters})"

    # -- the teacher's outputs ---------------------------------------------------------
    def teach(self, ctx, data) -> tuple[list[str], list[list[str]]]:
        """The teacher's answer and samples for every row."""
        if not self.config.relabel:
            return list(data["answer"]), [list(cs) or [a] for cs, a in zip(data["completions"], data["answer"])]
        from selfloop.progress import progress

        teacher = ctx.model if self.config.teacher == "incumbent" else ctx.load_model(self.config.teacher)
        prompts, levels = list(data["prompt"]), [int(d) for d in data["difficulty"]]
        answers, samples = [""] * len(prompts), [[] for _ in prompts]
        with progress(len(prompts), f"round {ctx.round} distill: teacher", "prompt") as bar:
            for level in sorted(set(levels)):
                idx = [i for i, v in enumerate(levels) if v == level]
                for start in range(0, len(idx), 500):
                    chunk = idx[start : start + 500]
                    for i, g in zip(chunk, ctx.generate([prompts[i] for i in chunk], max_new_tokens=ctx.task.max_new_tokens(level), model=teacher)):
                        answers[i], samples[i] = g.answer, list(g.completions) or [g.answer]
                    bar.update(len(chunk))
        return answers, samples

    def targets(self, ctx, data) -> tuple[list[dict], dict[str, int]]:
        from selfloop_plugins.filter.uncertainty import agreement

        c, task = self.config, ctx.task
        answers, samples = self.teach(ctx, data)
        references = data["reference"] if c.only_correct else [None] * len(data)
        counts = {"prompts": len(data), "low_agreement": 0, "malformed": 0, "incorrect": 0, "references_used": 0}
        rows = []
        for row_id, prompt, level, answer, sampled, reference in zip(data["id"], data["prompt"], data["difficulty"], answers, samples, references):
            if agreement(task, sampled, answer) < c.min_agreement - 1e-9:
                counts["low_agreement"] += 1
                continue
            if c.require_well_formed and not task.is_well_formed(prompt, answer):
                counts["malformed"] += 1
                continue
            if c.only_correct:
                if reference is None:
                    counts["incorrect"] += 1
                    continue
                counts["references_used"] += 1
                if c.targets == "completions":
                    chosen = [s for s in sampled if task.check(s, reference)]
                else:
                    chosen = [answer] if task.check(answer, reference) else []
            else:  # a refiner's answer need not be among its samples (e.g. a corrected one): then the answer itself
                chosen = [s for s in sampled if task.extract_answer(s) == answer] if c.targets == "completions" else []
                chosen = chosen or [answer]
            chosen = list(dict.fromkeys(chosen))[: c.max_per_prompt]
            if not chosen:
                counts["incorrect"] += 1
                continue
            rows += [dict(id=f"{row_id}#t{k}", prompt=prompt, answer=target, difficulty=level, round=ctx.round, source="distill/teacher")
                     for k, target in enumerate(chosen)]
        if not c.only_correct:
            del counts["incorrect"], counts["references_used"]
        return rows, counts

    # -- training ----------------------------------------------------------------------
    def optimize(self, ctx, data):
        from selfloop.data import blind, make_rows
        from selfloop.errors import StarvedRound
        from selfloop_plugins.optimize._shared import train_bootstrap
        from selfloop_plugins.optimize.sft import SFT, SFTConfig

        if ctx.round == 0:
            return train_bootstrap(ctx, data, self.name)
        c = self.config
        if c.only_correct and "reference" not in data.column_names:
            raise SelfloopError("optimize.distill.only_correct=true got rows without references; set loop.allow_references_in_training=true")
        rows, counts = self.targets(ctx, data)
        ctx.record(self.name, teacher=c.teacher, targets=len(rows), **counts)
        if not rows:
            dropped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items() if k != "prompts" and v) or "no rows"
            raise StarvedRound(f"the teacher gave no usable target for {len(data)} prompts ({dropped})")
        student, origin = self.student(ctx)
        ctx.record(self.name, student=origin)
        ctx.log.info("distill: %d targets for %d prompts; student: %s", len(rows), len(data), origin)
        sft = SFT(SFTConfig(max_steps=c.max_steps, batch_size=c.batch_size, learning_rate=c.learning_rate, lr_scheduler=c.lr_scheduler,
                            warmup_ratio=c.warmup_ratio, replay_fraction=c.replay_fraction))
        # sft trains a copy of ctx.model: hand it the student in a context that is otherwise this one
        candidate = sft.optimize(dataclasses.replace(ctx, model=student), blind(make_rows(rows)))
        candidate.train_metrics["targets"] = len(rows)
        return candidate


@hookimpl
def selfloop_register_optimizers(register):
    register(Distill)
