"""Draw unlabelled problems at the curriculum's current level and label them with the
incumbent model, through the configured refiners (e.g. self-consistency voting).

By default it also relabels the level below (``level_offsets: [-1, 0]``): labels made by an
earlier, weaker model carry its mistakes, and relabelling with the current model corrects
them. Levels the bootstrap labelled are skipped (their problems are already learnt), except
on a task that draws from a finite unlabelled pool (``task.unlabelled_pool``, e.g.
``task=dataset``): there the bootstrap used a small labelled split, and the pool's rows at
those levels are new data.

References come along for meta-evaluation only: the loop strips them before any filter
or optimizer sees the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfloop import hookimpl
from selfloop.strategy import Acquirer


@dataclass
class TaskSamplerConfig:
    n_problems: int = 2000
    # sample n_problems at ctx.level + each offset (bootstrap levels are skipped unless the
    # task draws from an unlabelled pool)
    level_offsets: list[int] = field(default_factory=lambda: [-1, 0])
    batch_size: int = 500


class TaskSampler(Acquirer):
    name = "task_sampler"
    Config = TaskSamplerConfig

    def acquire(self, ctx):
        from selfloop.data import generation_columns, make_rows
        from selfloop.progress import progress

        c = self.config
        labelled = set() if getattr(ctx.task, "unlabelled_pool", False) else set(ctx.run.loop.bootstrap.levels)
        levels = [ctx.level + o for o in c.level_offsets if ctx.level + o in ctx.task.levels and ctx.level + o not in labelled]
        if not levels:
            ctx.warn(self.name, f"nothing to acquire at level {ctx.level} with level_offsets={list(c.level_offsets)}: every such level is outside the task or labelled by the bootstrap")
        rows = []
        with progress(c.n_problems * len(levels), f"acquire round {ctx.round}", "problem") as bar:
            for level in levels:
                problems = ctx.task.sample(ctx.rng, level, c.n_problems)
                for start in range(0, len(problems), c.batch_size):
                    chunk = problems[start : start + c.batch_size]
                    gens = ctx.generate([p.prompt for p in chunk], max_new_tokens=ctx.task.max_new_tokens(level))
                    for i, (p, g) in enumerate(zip(chunk, gens), start=start):
                        rows.append(
                            dict(id=f"r{ctx.round:03d}-L{level}-{i}", prompt=p.prompt, answer=g.answer, reference=p.reference,
                                 difficulty=level, round=ctx.round, source=f"acquire/{self.name}", **generation_columns(g))
                        )
                    bar.update(len(chunk))
        return make_rows(rows)


@hookimpl
def selfloop_register_acquirers(register):
    register(TaskSampler)
