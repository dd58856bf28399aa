"""What the dpo, grpo and distill optimizers share: the supervised bootstrap, TRL arguments,
and the clean-up after a TRL trainer. Import-light: heavy imports stay inside functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from selfloop.errors import OptionError, SelfloopError


def bootstrap_sft_options(ctx: Any) -> Any:
    """The options round 0 trains with: ``loop.bootstrap.optimize.sft`` as an SFT config."""
    from selfloop.config import strategy_config

    opts = dict((ctx.run.loop.bootstrap.optimize or {}).get("sft") or {})
    try:
        return strategy_config(ctx.registry, "optimize", "sft", {}, opts)
    except SelfloopError as exc:
        raise SelfloopError(f"loop.bootstrap.optimize.sft (the bootstrap's supervised training): {exc}") from None


def check_bootstrap(ctx: Any, name: str) -> None:
    """Round 0 has labelled rows and no samples to rank, reward or distil: these optimizers
    train it with sft. Refuse round-0 options meant for them, which would be ignored."""
    given = (ctx.run.loop.bootstrap.optimize or {}).get(name)
    if given:
        raise SelfloopError(
            f"loop.bootstrap.optimize.{name}={dict(given)!r} would be ignored: round 0 (the labelled bootstrap) trains with sft "
            f"whatever the optimizer; set loop.bootstrap.optimize.sft.* instead"
        )
    bootstrap_sft_options(ctx)


def train_bootstrap(ctx: Any, data: Any, name: str) -> Any:
    """Round 0: supervised training on the bootstrap's labelled rows (sft)."""
    from selfloop_plugins.optimize.sft import SFT

    ctx.record(name, bootstrap="round 0 trains with sft on the labelled bootstrap rows (loop.bootstrap.optimize.sft)")
    return finish(SFT(bootstrap_sft_options(ctx)).optimize(ctx, data))


def trainer_args(cls: type, ctx: Any, output_dir: Any, on_cpu: bool, **options: Any) -> Any:
    """TRL arguments every optimizer here uses: no saving of its own (selfloop.training
    checkpoints by time), no reports, seeded from the stage, no activation checkpointing."""
    fields = {f.name for f in dataclasses.fields(cls)}
    no_checkpointing = {"activation_checkpointing": False} if "activation_checkpointing" in fields else {"gradient_checkpointing": False}
    return cls(
        output_dir=str(output_dir),
        save_strategy="no",
        report_to=[],
        seed=ctx.rng.randrange(2**31),
        use_cpu=on_cpu,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **no_checkpointing,
        **options,
    )


def frozen_copy(model: Any) -> Any:
    """A frozen copy of a model (a DPO/GRPO reference policy)."""
    import copy

    from selfloop.model import unpatch_forward

    ref = copy.deepcopy(model)
    unpatch_forward(ref)  # a deep copy must run its own weights (see selfloop.model.unpatch_forward)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def finish(candidate: Any) -> Any:
    """Undo what TRL trainers leave on a model: their ``forward`` wrapper and train mode."""
    from selfloop.model import unpatch_forward

    unpatch_forward(candidate.model)
    candidate.model.eval()
    return candidate


def last_logged(trainer: Any, key: str) -> float | None:
    """The last value the trainer logged under ``key`` (e.g. ``rewards/margins``)."""
    for entry in reversed(trainer.state.log_history):
        if key in entry:
            return float(entry[key])
    return None


def max_new_tokens(ctx: Any, difficulties: list[int]) -> int:
    """The longest answer the task allows for these rows' levels."""
    return max((ctx.task.max_new_tokens(int(d)) for d in set(difficulties)), default=ctx.task.max_new_tokens(ctx.level))


def check_range(option: str, value: Any, ok: bool, accepted: str) -> None:
    if not ok:
        raise OptionError(option, value, accepted)
