"""Benchmark the SFT round's optimizer steps per second against a bare PyTorch loop on the same
model and the same batches, in one process.

    python bench/train_throughput.py [--threads 2] [--steps 60] [--batch-size 64] [--n-embd 128 --n-layer 3]

Variants, each from a fresh copy of the same starting model, interleaved ``--repeat`` times:

- ``sft``: ``SFT.optimize`` as the loop runs it (TRL's SFTTrainer through
  ``selfloop.training.train``: loss logged every step, progress, budget and checkpoint callbacks;
  no checkpoint falls inside the run at the default ``loop.checkpoint_minutes``);
- ``sft_checkpointing``: the same with a checkpoint every ``--checkpoint-every`` steps (about);
- ``trl_alone``: the same SFTTrainer without selfloop's wrapper (logging every 10 steps, TRL's
  default; no callbacks of ours, no terminal output): what our per-step logging and callbacks cost;
- ``bare``: a hand-written loop over the very batches the trainer saw (recorded from its data
  collator in an untimed run): TRL's collator, forward with labels, backward, gradient clipping,
  the optimizer and LR schedule the Trainer uses, zero_grad.

Time is this process's CPU time (``time.process_time``), so the load other sessions put on a
shared machine does not enter the comparison (wall-clock steps/s are reported alongside).
Steps/s count the training call only (``trainer.train`` / the bare loop); steady state is step 2
to the last (what happens once per call, e.g. accelerate's ``gc.collect`` at the end, is
``per_call_fixed_s``); what a round adds around it (tokenizing, building the trainer) is
``sft_round_setup_s``.
Overhead = 1 - sft steps/s over bare steps/s. Target: TRL's overhead under 15%.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager


def context(args):
    from selfloop.data import make_rows
    from selfloop.testing import build_ctx

    overrides = [f"model.tiny.n_embd={args.n_embd}", f"model.tiny.n_layer={args.n_layer}"]
    ctx = build_ctx(tempfile.mkdtemp(prefix="bench-train-"), overrides, with_model=True, preset="")
    problems = [p for level in range(1, args.level + 1) for p in ctx.task.sample(random.Random(level), level, 300)]
    data = make_rows(dict(id=str(i), prompt=p.prompt, answer=p.reference, difficulty=p.difficulty) for i, p in enumerate(problems))
    return ctx, data.remove_columns("reference")


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run_sft(ctx, data, sft, variant: str, checkpoint_every_s: float | None = None) -> dict:
    """One SFT.optimize: {"train_s": seconds inside the training call, "round_s": the whole
    optimize (tokenizing, trainer construction, merging included), "checkpoints": n}."""
    from transformers import TrainerCallback

    from selfloop import training

    ctx.rng = random.Random(0)
    stats = {"checkpoints": 0, "step_ends": []}
    original_callbacks = training._callbacks

    class Observe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stats["step_ends"].append(time.process_time())

        def on_save(self, args, state, control, **kwargs):
            stats["checkpoints"] += 1

    def observed_callbacks(*a, **k):
        return [*original_callbacks(*a, **k), Observe()]

    def trl_alone(ctx, trainer, desc=None, tokens_per_step=None):
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.args.logging_steps = 10
        for cb in (ProgressCallback, PrinterCallback):  # terminal output is not what is compared
            trainer.remove_callback(cb)
        trainer.add_callback(Observe())
        return trainer.train()

    inner = trl_alone if variant == "trl_alone" else training.train

    def timed_train(*a, **k):
        start, wall = time.process_time(), time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            stats["train_s"], stats["train_wall_s"] = time.process_time() - start, time.perf_counter() - wall

    loop = ctx.run.loop
    minutes = loop.checkpoint_minutes
    if checkpoint_every_s is not None:
        loop.checkpoint_minutes = checkpoint_every_s / 60
    try:
        with patched(training, "_callbacks", observed_callbacks), patched(training, "train", timed_train):
            start = time.process_time()
            sft.optimize(ctx, data)
            stats["round_s"] = time.process_time() - start
    finally:
        loop.checkpoint_minutes = minutes
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    return stats


def recorded_batches(ctx, data, sft) -> list[list[dict]]:
    """The examples of every batch the trainer collates (an untimed run)."""
    from trl.trainer import sft_trainer

    batches = []
    collate = sft_trainer.DataCollatorForLanguageModeling.torch_call

    def spy(self, examples):
        batches.append([{k: list(v) for k, v in e.items()} for e in examples])
        return collate(self, examples)

    with patched(sft_trainer.DataCollatorForLanguageModeling, "torch_call", spy):
        run_sft(ctx, data, sft, "sft")
    return batches


def run_bare(ctx, batches, config) -> dict:
    """A plain PyTorch loop over ``batches``, as the Trainer trains them: {"train_s", "step_ends"}."""
    import torch
    from transformers import get_scheduler
    from trl import SFTConfig as TRLConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = ctx.model.clone().model
    model.train()
    args = TRLConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[])
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # the Trainer applies weight decay to weights, not biases or norms
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                  fused=args.optim == "adamw_torch_fused")
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * config.max_steps), num_training_steps=config.max_steps)
    collate = DataCollatorForLanguageModeling(pad_token_id=ctx.model.tokenizer.pad_token_id)
    step_ends = []
    start, wall = time.process_time(), time.perf_counter()
    for examples in batches:
        batch = collate(examples)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_ends.append(time.process_time())
    return {"train_s": time.process_time() - start, "train_wall_s": time.perf_counter() - wall, "step_ends": step_ends}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--level", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=float, default=2.0, help="seconds between checkpoints in sft_checkpointing")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch

    from selfloop_plugins.optimize.sft import SFT, SFTConfig

    torch.set_num_threads(args.threads)
    ctx, data = context(args)
    config = SFTConfig(max_steps=args.steps, batch_size=args.batch_size, replay_fraction=0.0)
    sft = SFT(config)
    batches = recorded_batches(ctx, data, sft)
    assert len(batches) == args.steps, f"recorded {len(batches)} batches for {args.steps} steps"
    runs: dict[str, list[dict]] = {"sft": [], "sft_checkpointing": [], "trl_alone": [], "bare": []}
    for _ in range(args.repeat):  # interleaved, so contention on a shared machine hits all alike
        runs["sft"].append(run_sft(ctx, data, sft, "sft"))
        runs["sft_checkpointing"].append(run_sft(ctx, data, sft, "sft", checkpoint_every_s=args.checkpoint_every))
        runs["trl_alone"].append(run_sft(ctx, data, sft, "trl_alone"))
        runs["bare"].append(run_bare(ctx, batches, config))
    med = statistics.median
    # the whole training call (setup and teardown inside trainer.train included) ...
    rate = {k: args.steps / med(r["train_s"] for r in v) for k, v in runs.items()}
    wall_rate = {k: args.steps / med(r["train_wall_s"] for r in v) for k, v in runs.items()}
    # ... and steady state: step 2 to the last, without what happens once per call
    steady = {k: med((len(r["step_ends"]) - 1) / (r["step_ends"][-1] - r["step_ends"][0]) for r in v) for k, v in runs.items()}
    times = {k: [r["train_s"] for r in v] for k, v in runs.items()}
    rounds = [r["round_s"] for r in runs["sft"]]
    n_ckpt = med(r["checkpoints"] for r in runs["sft_checkpointing"])
    print(json.dumps({
        "threads": args.threads,
        "model_parameters": ctx.model.num_parameters,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "steps_per_cpu_s": {k: round(v, 2) for k, v in rate.items()},
        "steps_per_wall_s": {k: round(v, 2) for k, v in wall_rate.items()},
        "steady_cpu_ms_per_step": {k: round(1000 / v, 1) for k, v in steady.items()},
        "trl_steady_overhead_vs_bare": round(1 - steady["sft"] / steady["bare"], 3),
        "per_call_fixed_s": {k: round(med(times[k]) - (args.steps - 1) / steady[k], 2) for k in runs},
        "sft_round_setup_s": round(med(rounds) - med(times["sft"]), 2),
        "trl_overhead_vs_bare": round(1 - rate["sft"] / rate["bare"], 3),
        "trl_alone_overhead_vs_bare": round(1 - rate["trl_alone"] / rate["bare"], 3),
        "selfloop_wrapper_cost_vs_trl_alone": round(1 - rate["sft"] / rate["trl_alone"], 3),
        "target_under_15pct_met": 1 - rate["sft"] / rate["bare"] < 0.15,
        "checkpoints_in_checkpointing_run": n_ckpt,
        "seconds_per_checkpoint": round((med(times["sft_checkpointing"]) - med(times["sft"])) / n_ckpt, 3) if n_ckpt else None,
        "repeats": args.repeat,
    }, indent=2))


if __name__ == "__main__":
    main()
