"""Execution feedback: a row passes when its program exits 0 in the sandbox.

The program is the task's ``program(prompt, answer)`` (e.g. ``assert value("9+8") == 17``),
or the answer itself for tasks without one (the answer is code). It is built from the
prompt and the model's answer only, never from a reference: execution checks answers
without labels, like unit tests, so the filter keeps data and the evaluator may steer
promotion.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import SelfloopError
from selfloop.strategy import Evaluator, Filter
from selfloop_sandbox.sandbox import Result, Sandbox, SandboxConfig


def programs(task, prompts, answers) -> list[str]:
    make = getattr(task, "program", None)
    return [make(p, a) if make else a for p, a in zip(prompts, answers)]


def require_programs(task, culprit: str) -> None:
    """Executing a task's plain answers ("321") passes trivially: a task must build programs
    (``program(prompt, answer)``) or declare that its answers are code."""
    if not callable(getattr(task, "program", None)) and not getattr(task, "answers_are_code", False):
        raise SelfloopError(
            f"{culprit} cannot check task {task.name!r}: it neither builds programs (program(prompt, answer)) nor declares "
            f"answers_are_code = True, and executing its plain answers would pass trivially; use it with task=make_number or a code task"
        )


def execute(ctx, config: SandboxConfig, prompts, answers, what: str, ids=None) -> list[Result]:
    """Run every row's program; log how it went (failures by reason, cost per program); rows
    whose program was killed (timeout, memory) go to the stage's row-error ledger."""
    started = time.monotonic()
    results = Sandbox(config).run_many(programs(ctx.task, prompts, answers))
    if ids is not None and hasattr(ctx, "row_error"):
        for row_id, r in zip(ids, results):
            if r.killed:
                ctx.row_error("code_exec", row_id, f"program killed: {r.killed}")
    if results:
        killed: dict[str, int] = {}
        for r in results:
            if r.killed:
                killed[r.killed] = killed.get(r.killed, 0) + 1
        ms = 1000 * (time.monotonic() - started) / len(results)
        notes = ", ".join(f"{n} {reason}" for reason, n in killed.items())
        network = "private network namespace" if results[0].network_isolated else "no network namespace"
        ctx.log.info(f"{what}: {sum(r.ok for r in results)}/{len(results)} programs passed{f' ({notes})' if notes else ''}; {ms:.0f} ms each, {network}")
        if hasattr(ctx, "record"):  # a run context: the counts go into the stage's metrics.json
            ctx.record("code_exec", programs=len(results), passed=sum(r.ok for r in results), killed=killed,
                       ms_per_program=round(ms, 1), network_isolated=results[0].network_isolated)
    return results


@dataclass
class CodeExecFilterConfig(SandboxConfig):
    timeout_s: float = 2.0
    cpu_s: int = 2


class CodeExecFilter(Filter):
    name = "code_exec"
    Config = CodeExecFilterConfig

    def setup(self, ctx):
        require_programs(ctx.task, f"filter {self.name!r}")

    def filter(self, ctx, data):
        results = execute(ctx, self.config, data["prompt"], data["answer"], f"filter.{self.name}", ids=data["id"])
        scores = [float(r.ok) for r in results]
        data = data.add_column(f"score_{self.name}", scores)
        return data.select([i for i, s in enumerate(scores) if s == 1.0])


@dataclass
class CodeExecEvalConfig(SandboxConfig):
    timeout_s: float = 2.0
    cpu_s: int = 2
    n_per_level: int = 64


class CodeExecEval(Evaluator):
    name = "code_exec"
    Config = CodeExecEvalConfig
    uses_references = False

    def setup(self, ctx):
        require_programs(ctx.task, f"evaluator {self.name!r}")

    def score(self, ctx, data):
        return [float(r.ok) for r in execute(ctx, self.config, data["prompt"], data["answer"], f"evaluate.{self.name}", ids=data["id"])]

    def evaluate(self, ctx, model):
        task, n = ctx.task, self.config.n_per_level
        rng = random.Random(f"{ctx.seed}:eval:{self.name}")  # the same prompts every round
        levels, prompts, answers = [], [], []
        for level in ctx.eval_levels:
            batch = [p.prompt for p in task.sample(rng, level, n)]
            outs = model.generate(batch, max_new_tokens=task.max_new_tokens(level))
            levels += [level] * len(batch)
            prompts += batch
            answers += [task.extract_answer(o[0]) if o else "" for o in outs]
        # One pool for every level: the workers stay busy across level boundaries.
        results = execute(ctx, self.config, prompts, answers, f"evaluate.{self.name}")
        by_level = {}
        for level in ctx.eval_levels:
            passed = [r.ok for lv, r in zip(levels, results) if lv == level]
            by_level[str(level)] = sum(passed) / len(passed) if passed else 0.0
        return {"score": sum(by_level.values()) / len(by_level) if by_level else 0.0, "by_level": by_level}


@hookimpl
def selfloop_register_filters(register):
    register(CodeExecFilter)


@hookimpl
def selfloop_register_evaluators(register):
    register(CodeExecEval)
