"""Hook specifications: the whole contract between the selfloop core and its plugins.

A plugin is a module registered under the ``selfloop`` entry-point group. It implements
any of the hooks below with the ``@hookimpl`` marker. Hooks evolve only by adding
arguments; pluggy lets an implementation accept any subset of them.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("selfloop")
hookimpl = pluggy.HookimplMarker("selfloop")


# --------------------------------------------------------------------------------------
# Registration hooks: called once at start-up, before any configuration is composed.
# Each receives ``register``: call it once per strategy class. The core owns names,
# collisions and bookkeeping; the class's ``Config`` dataclass becomes a Hydra option.
# --------------------------------------------------------------------------------------


@hookspec
def selfloop_register_tasks(register):
    """Register task classes: where prompts, difficulty levels and references come from.

    :param register: ``register(TaskClass)``; the class has ``name``, ``Config`` and
        ``sample(rng, level, n)`` (see :class:`selfloop.strategy.Task`).
    """


@hookspec
def selfloop_register_models(register):
    """Register model providers: classes whose ``build(ctx)`` returns a ``ModelHandle``.

    :param register: ``register(ProviderClass)``.
    """


@hookspec
def selfloop_register_acquirers(register):
    """Register acquirers (stage 1): ``acquire(ctx) -> datasets.Dataset``.

    :param register: ``register(AcquirerClass)``. Outputs of several acquirers are
        concatenated; each row follows the data contract in :mod:`selfloop.data`.
    """


@hookspec
def selfloop_register_filters(register):
    """Register filters (stage 2): ``filter(ctx, data) -> datasets.Dataset``.

    :param register: ``register(FilterClass)``. A filter adds its score column
        ``score_<name>`` and may only drop rows; filters run in the order configured.
    """


@hookspec
def selfloop_register_optimizers(register):
    """Register optimizers (stage 3): ``optimize(ctx, data) -> ModelHandle``.

    :param register: ``register(OptimizerClass)``. The returned model is a new
        candidate; the incumbent in ``ctx.model`` must be left untouched.
    """


@hookspec
def selfloop_register_refiners(register):
    """Register refiners (stage 4): ``refine(ctx, prompts, generate) -> list[Generation]``.

    :param register: ``register(RefinerClass)``. Refiners wrap generation and compose:
        the first configured refiner is outermost and calls the next through ``generate``.
    """


@hookspec
def selfloop_register_evaluators(register):
    """Register evaluators (the evaluation layer).

    :param register: ``register(EvaluatorClass)``; the class implements
        ``score(ctx, data) -> list[float]`` (one score per row) and
        ``evaluate(ctx, model) -> dict`` with a ``"score"`` key (higher is better).
        An evaluator with ``uses_references = True`` reads ground truth: the core reports
        it as meta-evaluation and never lets it steer promotion or training.
    """


# --------------------------------------------------------------------------------------
# Observer hooks: broadcast to every plugin; return values are ignored. Use them for
# loggers, drift monitors and budget guards. An exception raised here fails the run;
# ``ctx.request_stop(reason)`` stops it cleanly after the current stage instead.
#
# Delivery survives a kill: every completed stage's ``selfloop_on_stage_end`` and every
# finished round's ``selfloop_on_round_end`` is delivered at least once. The loop records
# each delivery after the hook returns; events a kill cut off are delivered again when the
# run resumes, with ``replayed=True``, before any new stage runs. An observer that keys what
# it writes by (round, stage) is exactly right; an append-only one sees a duplicate only if
# the kill fell inside its own hook call.
# --------------------------------------------------------------------------------------


@hookspec
def selfloop_on_run_start(ctx):
    """Called once when a run starts or resumes, before its first pending stage.

    :param ctx: the :class:`selfloop.context.RunContext`.
    """


@hookspec
def selfloop_on_round_start(ctx):
    """Called before the first pending stage of a round; ``ctx.round`` is set.

    :param ctx: the run context.
    """


@hookspec
def selfloop_on_stage_start(ctx, stage):
    """Called before a stage runs (never for a stage skipped because it already completed).

    :param ctx: the run context.
    :param stage: ``"acquire"``, ``"filter"``, ``"optimize"``, ``"evaluate"`` or ``"promote"``.
    """


@hookspec
def selfloop_on_stage_end(ctx, stage, metrics, replayed):
    """Called after a stage's outputs and completion marker are on disk.

    :param ctx: the run context (``ctx.round`` is the stage's round).
    :param stage: the stage name.
    :param metrics: the dict saved as the stage's ``metrics.json``.
    :param replayed: ``True`` when the event is delivered again on resume because a kill
        cut off its first delivery (added in 0.2; accept it to tell the two apart).
    """


@hookspec
def selfloop_on_round_end(ctx, record, replayed):
    """Called after a round is promoted, rejected or recorded as starved.

    :param ctx: the run context.
    :param record: the round's line in ``metrics.jsonl`` (keys in docs/hooks.md).
    :param replayed: ``True`` when delivered again on resume (see above).
    """


@hookspec
def selfloop_on_run_end(ctx, status):
    """Called once when the run stops, however it stops.

    :param ctx: the run context.
    :param status: ``"completed"``, ``"failed"``, ``"interrupted"`` (Ctrl-C, SIGTERM),
        ``"budget_exhausted"``, ``"starved"`` (``loop.max_starved_rounds`` starved rounds in a
        row) or ``"stopped"`` (a guard called ``ctx.request_stop``).
    """
