"""Run a transformers/TRL trainer the way the loop needs: checkpointed, resumable inside the
stage, counted against the compute budget, with readable progress.

Every built-in optimizer trains through :func:`train`; third-party optimizers should too::

    trainer = SFTTrainer(model=..., args=SFTConfig(output_dir=str(ctx.checkpoint_dir), ...), ...)
    result = selfloop.training.train(ctx, trainer)

``train`` adds three callbacks: progress (a bar on a terminal, plain lines in a log file),
the budget (steps and trained tokens go to ``ctx.budget``, which stops the run within one
step of a ``loop.max_train_tokens`` / ``max_flops`` limit) and checkpoints (every
``loop.checkpoint_minutes``, into ``ctx.checkpoint_dir``, which survives a kill). If that
directory holds a finished checkpoint, training resumes from it: the trainer restores
weights, optimizer, scheduler, RNG states and its place in the data, so a killed and resumed
stage ends with the same model as an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

DONE = "SELFLOOP_CHECKPOINT_DONE"  # written after the trainer finished writing a checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def finished_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints the trainer finished writing, oldest first (a kill mid-save leaves one
    without the marker, which is ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and (p / DONE).exists()]
    return [p for _, p in sorted(found)]


def _callbacks(ctx: Any, desc: str, tokens_per_step: Any):
    from transformers import TrainerCallback

    from selfloop.progress import trainer_progress_callback

    every = ctx.run.loop.checkpoint_minutes * 60
    params = ctx.model.num_parameters if ctx.model is not None else 0

    def tokens(step: int) -> int:
        return int(tokens_per_step(step)) if tokens_per_step else 0

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # steps done before a kill count as this stage's, so its metrics equal an uninterrupted run's
            done = state.global_step
            if done:
                ctx.budget.charge_training(steps=done, tokens=sum(tokens(s) for s in range(1, done + 1)), parameters=params)

        def on_step_end(self, args, state, control, **kwargs):
            ctx.budget.charge_training(steps=1, tokens=tokens(state.global_step), parameters=params)

    class Checkpoints(TrainerCallback):
        def __init__(self):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if every > 0 and time.monotonic() - self.last >= every and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()
            folder = Path(args.output_dir)
            newest = folder / f"checkpoint-{state.global_step}"
            if newest.is_dir():
                (newest / DONE).write_text(str(state.global_step))
            for old in finished_checkpoints(folder)[:-1]:
                shutil.rmtree(old, ignore_errors=True)

    return [trainer_progress_callback(desc), Budget(), Checkpoints()]


def train(ctx: Any, trainer: Any, desc: str | None = None, tokens_per_step: Any = None) -> Any:
    """``trainer.train()`` with progress, budget and checkpoints; resumes from the stage's
    last finished checkpoint. ``trainer.args.output_dir`` must be ``ctx.checkpoint_dir`` (or a
    folder in it, one per trainer when a stage trains more than once);
    ``tokens_per_step(step)`` (optional) gives the tokens trained at a step, for the budget.
    Returns the trainer's ``TrainOutput``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    folder, home = Path(trainer.args.output_dir).resolve(), Path(ctx.checkpoint_dir).resolve()
    if folder != home and home not in folder.parents:
        raise ValueError(f"the trainer's output_dir must be ctx.checkpoint_dir ({ctx.checkpoint_dir}) or a folder in it, got {folder}")
    args = trainer.args
    args.save_strategy = SaveStrategy.NO  # checkpoints are taken by time, by our callback
    args.save_total_limit = None
    # every step's loss goes to state.log_history, which checkpoints carry: the mean loss of a
    # resumed stage then covers all its steps (the Trainer's own training_loss would not)
    args.logging_strategy, args.logging_steps, args.report_to = IntervalStrategy.STEPS, 1, []
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    for cb in _callbacks(ctx, desc or f"round {ctx.round} {ctx.stage}", tokens_per_step):
        trainer.add_callback(cb)
    done = finished_checkpoints(folder)
    resume = str(done[-1]) if done else None
    if resume:
        ctx.log.info("resuming %s from %s", ctx.stage, os.path.relpath(resume, ctx.run_dir.root))
        ctx.record("training", resumed_from_step=int(done[-1].name.split("-")[1]))
    result = trainer.train(resume_from_checkpoint=resume)
    from selfloop.model import unpatch_forward

    unpatch_forward(trainer.model)  # the trained model must be cloneable (see unpatch_forward)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return result._replace(training_loss=sum(losses) / len(losses)) if losses else result
