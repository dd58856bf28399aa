"""The run context handed to every strategy: what a stage may read and use."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
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


class BudgetExhausted(Exception):
    """A compute budget (``loop.max_*``) is spent: the loop stops cleanly, resumable with a
    larger budget. Raised within one generated batch or one training step of the limit."""


@dataclass
class BudgetMeter:
    """Counts compute and enforces the run's budgets (``loop.max_minutes``,
    ``max_generated_tokens``, ``max_train_tokens``, ``max_flops``).

    Generated sequences and tokens are counted by ``ModelHandle`` itself (evaluators and
    filters that generate included); optimizers count training with ``charge_training`` (the
    callbacks of :mod:`selfloop.training` do it for TRL trainers). FLOPs are estimated as
    2 x parameters per generated token and 6 x parameters per trained token.
    """

    max_minutes: float | None = None
    max_generated_tokens: int | None = None
    max_train_tokens: int | None = None
    max_flops: float | None = None
    started: float = field(default_factory=time.monotonic)
    train_steps: int = 0
    train_tokens: int = 0
    generated_sequences: int = 0
    generated_tokens: int = 0
    flops: float = 0.0

    @property
    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    def over(self) -> str | None:
        """Which budget is spent (``"loop.max_flops=..."``), or None."""
        for option, used, limit in (
            ("max_minutes", self.elapsed_minutes, self.max_minutes),
            ("max_generated_tokens", self.generated_tokens, self.max_generated_tokens),
            ("max_train_tokens", self.train_tokens, self.max_train_tokens),
            ("max_flops", self.flops, self.max_flops),
        ):
            if limit is not None and used >= limit:
                return f"loop.{option}={limit} spent ({used:.4g} used)"
        return None

    def exhausted(self) -> bool:
        return self.over() is not None

    def charge_generation(self, sequences: int, tokens: int, parameters: int) -> None:
        self.generated_sequences += sequences
        self.generated_tokens += tokens
        self.flops += 2.0 * parameters * tokens
        self._check()

    def charge_training(self, steps: int = 0, tokens: int = 0, parameters: int = 0) -> None:
        """Add an optimizer's steps and trained tokens; raises BudgetExhausted past a limit."""
        self.train_steps += steps
        self.train_tokens += tokens
        self.flops += 6.0 * parameters * tokens
        self._check()

    def _check(self) -> None:
        # wall time is checked between rounds only: a round is the unit a time budget buys
        for option, used, limit in (
            ("max_generated_tokens", self.generated_tokens, self.max_generated_tokens),
            ("max_train_tokens", self.train_tokens, self.max_train_tokens),
            ("max_flops", self.flops, self.max_flops),
        ):
            if limit is not None and used > limit:
                raise BudgetExhausted(f"loop.{option}={limit} spent ({used:.4g} used)")

    def snapshot(self) -> dict[str, float]:
        return {"train_steps": self.train_steps, "train_tokens": self.train_tokens, "generated_sequences": self.generated_sequences,
                "generated_tokens": self.generated_tokens, "flops": self.flops}


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
    # what strategies recorded during the current stage (see record, warn)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # rows strategies could not process during the current stage (see row_error)
    row_errors: list[dict[str, str]] = field(default_factory=list)
    # files strategies add to the current stage's directory (see save_artifact)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    # warnings raised while the run was set up (composition), kept in run.json and the report
    setup_warnings: list[str] = field(default_factory=list)
    # set by request_stop: the loop stops after the current stage
    stop_reason: str | None = None
    # the evaluate stage's results so far, {evaluator: result}, for evaluators that judge others
    evaluation: dict[str, Any] = field(default_factory=dict)
    _warned: set = field(default_factory=set, repr=False)

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def eval_levels(self) -> list[int]:
        """The levels evaluators measure this round: ``loop.eval_levels`` (``auto``: every
        task level up to the curriculum level + 4)."""
        chosen, levels = self.run.loop.eval_levels, list(self.task.levels)
        if chosen == "all":
            return levels
        if chosen == "auto":
            return [v for v in levels if v <= self.level + 4] or levels[:1]
        return list(chosen)

    def record(self, strategy: str, **values: Any) -> None:
        """Add JSON-serialisable values to this stage's ``metrics.json`` under
        ``notes.<strategy>`` (e.g. which backend ran, how many programs timed out); observers
        such as loggers see them in the stage's metrics."""
        self.notes.setdefault(strategy, {}).update(values)

    def warn(self, strategy: str, message: str) -> None:
        """Say that a strategy could not do (all of) its job, e.g. a filter that cannot check
        this task's rows. Logged once per run; kept in the stage's metrics
        (``notes.<strategy>.warnings``), the round record's ``warnings`` and the report. Called
        from ``setup`` it goes to ``run.json`` and the report instead."""
        if (strategy, message) not in self._warned:
            self._warned.add((strategy, message))
            self.log.warning("%s: %s", strategy, message)
        if not self.stage:
            if f"{strategy}: {message}" not in self.setup_warnings:
                self.setup_warnings.append(f"{strategy}: {message}")
            return
        warnings = self.notes.setdefault(strategy, {}).setdefault("warnings", [])
        if message not in warnings:
            warnings.append(message)

    def row_error(self, strategy: str, row_id: str, reason: str) -> None:
        """Record a row the strategy could not process (an unparseable judgement, a timeout,
        a regex without a match). The stage writes them to ``row_errors.jsonl`` and counts them
        per strategy in its metrics; it fails when their share of the stage's rows exceeds
        ``loop.max_row_error_share``. No row disappears silently."""
        self.row_errors.append({"strategy": strategy, "id": str(row_id), "reason": str(reason)})

    def save_artifact(self, strategy: str, filename: str, content: str | bytes) -> str:
        """Add a file to the current stage's directory, written with its outputs (and checked
        like them): ``round-NNN/<stage>/artifacts/<strategy>/<filename>``. Returns that path
        relative to the stage directory; later rounds read it through ``ctx.run_dir``."""
        if not self.stage:
            raise RuntimeError("save_artifact is for strategies running inside a stage")
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"artifact file names are plain names, got {filename!r}")
        rel = f"artifacts/{strategy}/{filename}"
        self.artifacts[rel] = content.encode() if isinstance(content, str) else bytes(content)
        return rel

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop cleanly after the current stage (a guard such as a drift
        monitor); the run ends with status ``stopped`` and the reason in ``run.json``. The
        first reason given wins (a later guard reacting to the same event adds nothing)."""
        self.stop_reason = self.stop_reason or reason

    def history(self) -> list[dict[str, Any]]:
        """Records of the rounds finished before this one (the lines of ``metrics.jsonl``),
        e.g. for thresholds that adapt to past label precision or kept fractions."""
        return [r for r in self.run_dir.records() if r["round"] < self.round]

    @property
    def checkpoint_dir(self) -> Path:
        """Where the running stage keeps resumable state (training checkpoints); it survives
        a kill and is deleted when the stage completes."""
        return self.run_dir.checkpoint_dir(self.round, self.stage)

    def load_model(self, source: str = "bootstrap") -> ModelHandle:
        """A second model for a strategy (a verifier, a reference policy, a teacher):
        ``"incumbent"`` (``ctx.model``), ``"bootstrap"`` (round 0's model), ``"round:N"``
        (round N's candidate), ``"previous"`` (the incumbent before the current one), or a
        local directory or hub name (safetensors only). Each call loads a fresh copy."""
        from selfloop.errors import SelfloopError
        from selfloop.model import ModelHandle

        if source == "incumbent":
            if self.model is None:
                raise SelfloopError("no incumbent model yet (the bootstrap has not finished)")
            return self.model.clone()
        round_: int | None = None
        if source == "bootstrap":
            round_ = 0
        elif source == "previous":
            promoted = [r["round"] for r in self.history() if r.get("promoted")]
            if len(promoted) < 2:
                raise SelfloopError("no previous incumbent: fewer than two rounds were promoted")
            round_ = promoted[-2]
        elif source.startswith("round:"):
            round_ = int(source.split(":", 1)[1])
        if round_ is not None:
            path = self.run_dir.stage_dir(round_, "optimize") / "model"
            if not self.run_dir.is_complete(round_, "optimize") or not path.is_dir():
                raise SelfloopError(f"round {round_} has no trained model in {self.run_dir.root}")
            self.run_dir.verify(round_, "optimize")
            return self.reload_model(path)
        return ModelHandle.load(source, device=self.device)

    def reload_model(self, path: Path) -> ModelHandle:
        """A model this run saved, through the model provider's ``load`` (its device and
        generation backend); providers without one get ``ModelHandle.load``."""
        from selfloop.model import ModelHandle

        provider = next(iter(self.strategies.get("model", [])), None)
        load = getattr(provider, "load", None)
        if callable(load):
            from selfloop.errors import blame

            with blame(f"model provider {getattr(provider, 'name', provider)!r}"):
                return load(self, path)
        return ModelHandle.load(path, device=self.device)

    def strategy(self, kind: str, name: str) -> Any:
        """Another configured strategy by name (e.g. an evaluator used as a filter criterion)."""
        for s in self.strategies.get(kind, []):
            if s.name == name:
                return s
        configured = [s.name for s in self.strategies.get(kind, [])]
        raise KeyError(f"no {kind} {name!r} in this run; configured: {configured}")

    def generate(self, prompts: list[str], max_new_tokens: int = 64, model: ModelHandle | None = None, refine: bool = True) -> list[Generation]:
        """Generate through the configured refiner chain (first refiner outermost).

        Without refiners (or ``refine=False``) each prompt gets one greedy completion. The
        model's generations carry ``extra["sampling"]`` (temperature, n, per-completion mean
        log-probabilities). A refiner calls the next layer as ``generate(prompts, n=...,
        temperature=..., max_new_tokens=...)``; ``max_new_tokens`` defaults to the caller's (a
        chain-of-thought refiner raises it for room to reason).
        """
        handle = model or self.model
        if handle is None:
            raise RuntimeError("no model to generate with yet")
        task = self.task

        # stand-ins for ModelHandle in tests may not offer log-probabilities
        with_logprobs = "return_logprobs" in inspect.signature(handle.generate).parameters

        caller_max = max_new_tokens

        def base(ps: list[str], n: int = 1, temperature: float = 0.0, max_new_tokens: int = caller_max) -> list[Generation]:
            if with_logprobs:
                outs, logprobs = handle.generate(ps, n=n, temperature=temperature, max_new_tokens=max_new_tokens, return_logprobs=True)
            else:
                outs = handle.generate(ps, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
                logprobs = [[] for _ in ps]
            return [
                Generation(p, cs, task.extract_answer(cs[0]) if cs else "", extra={"sampling": {"temperature": temperature, "n": n, "logprobs": lp}})
                for p, cs, lp in zip(ps, outs, logprobs)
            ]

        fn = base
        for refiner in reversed(self.strategies.get("refine", []) if refine else []):
            fn = _bind(refiner, self, fn)
        return fn(list(prompts))

    def training_history(self) -> Dataset:
        """Rows trained on in earlier promoted rounds (bootstrap first), without references."""
        from selfloop.data import BLIND_COLUMNS, blind, concat, conform, load

        parts = []
        for record in self.run_dir.records():
            if record["round"] >= self.round or not record["promoted"]:
                continue
            stage = "acquire" if record["round"] == 0 else "filter"
            self.run_dir.verify(record["round"], stage)
            data = conform(load(self.run_dir.stage_dir(record["round"], stage) / "data"))
            parts.append(data.select_columns(list(BLIND_COLUMNS)))
        return blind(concat(parts))


def _bind(refiner: Any, ctx: RunContext, inner: Any) -> Any:
    culprit = ctx.registry.describe("refine", refiner.name)

    def refined(ps: list[str], n: int = 1, temperature: float = 0.0, **options: Any) -> list[Generation]:
        # An outer layer's sampling request (and e.g. a larger max_new_tokens) becomes the
        # default of this layer's calls.
        with blame(culprit):
            out = refiner.refine(ctx, ps, functools.partial(inner, n=n, temperature=temperature, **options))
        if not isinstance(out, list) or len(out) != len(ps) or not all(isinstance(g, Generation) for g in out):
            got = f"a list of {len(out)}" if isinstance(out, list) else type(out).__name__
            raise ContractError(f"{culprit} returned {got}; expected a list of {len(ps)} Generation, one per prompt in order")
        return out

    return refined
