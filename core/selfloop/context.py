"""The run context handed to every strategy: what a stage may read and use."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from selfloop.errors import ContractError, blame
from selfloop.strategy import Generation

if TYPE_CHECKING:
    from datasets import Dataset
    from omegaconf import DictConfig

    from selfloop.config import RunConfig
    from selfloop.model import ModelHandle
    from selfloop.registry import Registry
    from selfloop.rundir import RunDir
    from selfloop.strategy import Task

log = logging.getLogger("selfloop")


def stage_seed(seed: int, round_: int, stage: str) -> int:
    """A seed per (run seed, round, stage): a resumed stage replays exactly."""
    digest = hashlib.sha256(f"{seed}:{round_}:{stage}".encode()).hexdigest()
    return int(digest[:8], 16)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class BudgetMeter:
    """Counts compute; the loop stops starting rounds past ``max_minutes``.

    Optimizers add their steps to ``train_steps``; generated sequences are counted by
    ``ModelHandle`` itself, so evaluators and filters that generate are counted too.
    """

    max_minutes: float | None = None
    started: float = field(default_factory=time.monotonic)
    train_steps: int = 0

    @property
    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    def exhausted(self) -> bool:
        return self.max_minutes is not None and self.elapsed_minutes >= self.max_minutes


@dataclass
class RunContext:
    """What strategies see. ``model`` is the incumbent; never modify it in place."""

    cfg: DictConfig
    run: RunConfig
    run_dir: RunDir
    registry: Registry
    hook: Any
    task: Task
    strategies: dict[str, list[Any]]
    device: str = "cpu"
    model: ModelHandle | None = None
    round: int = 0
    level: int = 0
    stage: str = ""
    rng: random.Random = field(default_factory=random.Random)
    budget: BudgetMeter = field(default_factory=BudgetMeter)
    log: logging.Logger = log
    # what strategies recorded during the current stage (see record)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def eval_levels(self) -> list[int]:
        return list(self.run.loop.eval_levels or self.task.levels)

    def record(self, strategy: str, **values: Any) -> None:
        """Add JSON-serialisable values to this stage's ``metrics.json`` under
        ``notes.<strategy>`` (e.g. which backend ran, how many programs timed out); observers
        such as loggers see them in the stage's metrics."""
        self.notes.setdefault(strategy, {}).update(values)

    def strategy(self, kind: str, name: str) -> Any:
        """Another configured strategy by name (e.g. an evaluator used as a filter criterion)."""
        for s in self.strategies.get(kind, []):
            if s.name == name:
                return s
        configured = [s.name for s in self.strategies.get(kind, [])]
        raise KeyError(f"no {kind} {name!r} in this run; configured: {configured}")

    def generate(self, prompts: list[str], max_new_tokens: int = 64, model: ModelHandle | None = None, refine: bool = True) -> list[Generation]:
        """Generate through the configured refiner chain (first refiner outermost).

        Without refiners (or ``refine=False``) each prompt gets one greedy completion.
        """
        handle = model or self.model
        if handle is None:
            raise RuntimeError("no model to generate with yet")
        task = self.task

        def base(ps: list[str], n: int = 1, temperature: float = 0.0) -> list[Generation]:
            outs = handle.generate(ps, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
            return [Generation(p, cs, task.extract_answer(cs[0]) if cs else "") for p, cs in zip(ps, outs)]

        fn = base
        for refiner in reversed(self.strategies.get("refine", []) if refine else []):
            fn = _bind(refiner, self, fn)
        return fn(list(prompts))

    def training_history(self) -> Dataset:
        """Rows trained on in earlier promoted rounds (bootstrap first), without references."""
        from selfloop.data import BLIND_COLUMNS, blind, concat, load

        parts = []
        for record in self.run_dir.records():
            if record["round"] >= self.round or not record["promoted"]:
                continue
            stage = "acquire" if record["round"] == 0 else "filter"
            data = load(self.run_dir.stage_dir(record["round"], stage) / "data")
            parts.append(data.select_columns(list(BLIND_COLUMNS)))
        return blind(concat(parts))


def _bind(refiner: Any, ctx: RunContext, inner: Any) -> Any:
    culprit = ctx.registry.describe("refine", refiner.name)

    def refined(ps: list[str], n: int = 1, temperature: float = 0.0) -> list[Generation]:
        # An outer layer's sampling request becomes the default of this layer's calls.
        with blame(culprit):
            out = refiner.refine(ctx, ps, functools.partial(inner, n=n, temperature=temperature))
        if not isinstance(out, list) or len(out) != len(ps) or not all(isinstance(g, Generation) for g in out):
            got = f"a list of {len(out)}" if isinstance(out, list) else type(out).__name__
            raise ContractError(f"{culprit} returned {got}; expected a list of {len(ps)} Generation, one per prompt in order")
        return out

    return refined
