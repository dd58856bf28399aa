"""The loop: rounds of acquire -> filter -> optimize -> evaluate -> promote.

Round 0 is the bootstrap: the task's easy levels with references (the run's only labels,
counted) train the model built by the model provider. Every later round labels harder
problems with the incumbent model and trains a candidate on what the filters keep; the
candidate replaces the incumbent only if no autonomous evaluator scores it worse. A round
whose filters keep nothing (or whose optimizer finds nothing to learn) is *starved*: nothing
is trained or promoted, and the run stops after ``loop.max_starved_rounds`` in a row.

Each stage reads its inputs from the run directory (checked against the hashes its producer
recorded) and writes its outputs there atomically, with a seed derived from (seed, round,
stage): a killed run resumes at the first incomplete stage and reaches the same result as an
uninterrupted one. Observers get every stage and round event at least once; events a kill
cut off are replayed on resume with ``replayed=True``.

Importing this module imports no torch: validation (``prepare``) runs before any model.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig

from selfloop import data as contract
from selfloop.config import Advance, check_known, instantiate, resolve_levels, selected, strategy_config, validate_run_config
from selfloop.context import BudgetExhausted, BudgetMeter, RunContext, seed_everything, stage_seed
from selfloop.errors import ContractError, OptionError, RunInterrupted, SelfloopError, StarvedRound, add_note, blame
from selfloop.registry import STAGES, Registry
from selfloop.rundir import STAGE_ORDER, RunDir, package_versions

# the share of exact match at which a level counts as mastered (the frontier)
FRONTIER_ACCURACY = 0.9


class StopRequested(Exception):
    """A guard called ``ctx.request_stop``: the loop stops after the stage that just finished."""


@dataclass
class LoopState:
    """What the next round starts from, derived from finished rounds' records."""

    level: int
    incumbent_round: int | None  # whose optimize/model is the incumbent (None: before bootstrap)
    starved_in_a_row: int = 0


def describe(strategy: Any, kind: str, registry: Registry) -> str:
    return registry.describe(kind, strategy.name)


def prepare(cfg: DictConfig, registry: Registry, run_dir: RunDir, hook: Any = None) -> RunContext:
    """Validate a composed config and build the run's strategies and context, writing nothing
    and importing no torch: every bad option fails here, as one line.

    Order: strategy names, run options (types and ranges), each strategy's options (its
    Config's ``__post_init__``), the task's levels against the loop's level settings, then
    each strategy's ``setup(ctx)``.
    """
    check_known(registry, cfg)
    run = validate_run_config(cfg)
    (task,) = instantiate(registry, cfg, "task")
    warnings = resolve_levels(run, task)
    strategies = {kind: instantiate(registry, cfg, kind) for kind in ("model", *STAGES)}
    # round 0's option overrides too, so a typo fails now rather than after the run began
    (optimizer,) = selected(cfg, "optimize")
    strategy_config(registry, "optimize", optimizer, cfg.optimize[optimizer], dict(run.loop.bootstrap.optimize.get(optimizer) or {}))
    loop = run.loop
    ctx = RunContext(
        cfg=cfg,
        run=run,
        run_dir=run_dir,
        registry=registry,
        hook=hook,
        task=task,
        strategies=strategies,
        budget=BudgetMeter(loop.max_minutes, loop.max_generated_tokens, loop.max_train_tokens, loop.max_flops),
    )
    if not getattr(task, "has_references", True):
        meta = [e.name for e in strategies["evaluate"] if getattr(e, "uses_references", False)]
        strategies["evaluate"] = [e for e in strategies["evaluate"] if not getattr(e, "uses_references", False)]
        warnings.append(
            f"task {task.name!r} has no ground truth: no meta-evaluation exists for this run (label precision and accuracy "
            f"are unknown){'; skipped ' + ', '.join(meta) if meta else ''}"
        )
    for kind, members in (("task", [task]), *strategies.items()):
        for strategy in members:
            setup = getattr(strategy, "setup", None)
            if not callable(setup):
                continue
            culprit = describe(strategy, kind, registry)
            try:
                with blame(culprit):
                    setup(ctx)
            except OptionError as exc:
                raise exc.located(f"{kind}.{strategy.name}.") from None
            except ValueError as exc:
                raise SelfloopError(f"{culprit} cannot run with this config: {exc}") from None
    for message in warnings:  # (strategies' own ctx.warn calls log themselves)
        ctx.log.warning("%s", message)
    ctx.setup_warnings[:0] = warnings
    return ctx


class Loop:
    def __init__(self, cfg: DictConfig, run_dir: RunDir, plugins: Any, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = run_dir
        self.plugins = plugins
        self.echo = echo
        self.ctx = prepare(cfg, plugins.registry, run_dir, plugins.hook)
        self.run = self.ctx.run
        from selfloop.model import resolve_device

        self.ctx.device = str(resolve_device(self.run.device))

    # -- the whole run ---------------------------------------------------------------------
    def execute(self) -> str:
        """Run (or resume) every round; return the final status. The caller holds the lock."""
        import datasets

        from selfloop.model import ModelHandle
        from selfloop.progress import quiet_libraries

        rd, ctx, notify = self.run_dir, self.ctx, self.plugins.notify
        quiet_libraries()
        datasets.disable_caching()  # transforms must never write cache files into finished stages
        fresh = not any(rd.root.glob("round-*"))
        for path in rd.clean_temporary_files():
            self.echo(f"resume: removed the temporary file {path.relative_to(rd.root)}")
        for what in rd.clean_partial():
            self.echo(f"resume: removed {what}; it will be recomputed")
        if not fresh:
            self.echo(f"resuming {rd.root} at {self.next_stage()}")
        rd.write_run_json(
            status="running",
            seed=self.run.seed,
            versions=package_versions(),
            plugins={n: {"distribution": i.distribution, "version": i.version, "hooks": i.hooks} for n, i in self.plugins.info.items() if not i.error},
            warnings=ctx.setup_warnings,
            error=None,
            stop_reason=None,
        )
        if fresh or not rd.observers_json.exists() and not rd.records():
            rd.acknowledge(stage=None, round=None)
        status, reason = "failed", None
        ModelHandle.on_generated = ctx.budget.charge_generation
        try:
            notify("selfloop_on_run_start", ctx=ctx)
            self.replay_events()
            for round_ in range(self.run.loop.rounds + 1):
                if rd.is_complete(round_, "promote"):
                    continue
                reason = ctx.budget.over() or self.starved_too_long() or ctx.stop_reason
                if reason:
                    status = "budget_exhausted" if ctx.budget.over() else ("starved" if self.starved_too_long() else "stopped")
                    break
                self.run_round(round_)
            else:
                status = "completed"
        except StopRequested:
            status, reason = "stopped", ctx.stop_reason
        except BudgetExhausted as exc:
            status, reason = "budget_exhausted", str(exc)
        except BaseException as exc:
            interrupted = isinstance(exc, (KeyboardInterrupt, RunInterrupted))
            status = "interrupted" if interrupted else "failed"
            rd.write_run_json(status=status, error=None if interrupted else f"{type(exc).__name__}: {exc}")
            try:
                self.render_report(status)
            except Exception as also:  # the run's own error is the one to report
                add_note(exc, f"rendering the report failed too: {type(also).__name__}: {also}")
            try:  # every observer that saw the start sees the end, e.g. to close its files
                notify("selfloop_on_run_end", ctx=ctx, status=status)
            except Exception as also:  # the run's own error is the one to report
                add_note(exc, f"selfloop_on_run_end failed too: {type(also).__name__}: {also}")
            raise
        finally:
            ModelHandle.on_generated = None
        if reason:
            self.echo(f"stopping: {reason}")
        self.render_report(status, reason)  # before the status says the run is over
        rd.write_run_json(status=status, stop_reason=reason, warnings=ctx.setup_warnings)  # observers may have warned
        notify("selfloop_on_run_end", ctx=ctx, status=status)
        return status

    def render_report(self, status: str, reason: str | None = None) -> None:
        from selfloop.report import render

        rd = self.run_dir
        if rd.records():
            rd.write_metrics_jsonl()  # rebuilt from the round records, e.g. after it was deleted
            render(rd.root, status=status, stop_reason=reason)

    def next_stage(self) -> str:
        for round_ in range(self.run.loop.rounds + 1):
            for stage in STAGE_ORDER:
                if round_ == 0 and stage == "filter":
                    continue
                if not self.run_dir.is_complete(round_, stage):
                    return f"round {round_}, stage {stage}"
        return "its end (every round is complete)"

    def state(self) -> LoopState:
        records = self.run_dir.records()
        if not records:
            return LoopState(level=self.run.loop.curriculum.start_level, incumbent_round=None)
        streak = 0
        for record in reversed(records):
            if not record.get("starved"):
                break
            streak += 1
        last = records[-1]
        return LoopState(level=last["next_level"], incumbent_round=last["incumbent_round"], starved_in_a_row=streak)

    def starved_too_long(self) -> str | None:
        streak = self.state().starved_in_a_row
        limit = self.run.loop.max_starved_rounds
        return f"{streak} starved rounds in a row (loop.max_starved_rounds={limit}): the filters keep nothing to learn from" if streak >= limit else None

    # -- observer events -------------------------------------------------------------------
    def replay_events(self) -> None:
        """Deliver the stage and round events that a kill cut off, marked ``replayed``."""
        rd, ctx = self.run_dir, self.ctx
        if not rd.observers_json.exists():
            return  # a run from before delivery was recorded: nothing to replay
        acked = rd.delivered()
        last_stage = tuple(acked["stage"]) if acked.get("stage") else (-1, "")
        last_round = acked["round"] if acked.get("round") is not None else -1
        saved_round = ctx.round
        for round_, stage in rd.stages():
            if not rd.is_complete(round_, stage):
                continue
            ctx.round = round_
            if (round_, STAGE_ORDER.index(stage)) > (last_stage[0], STAGE_ORDER.index(last_stage[1]) if last_stage[1] else -1):
                self.deliver_stage_end(round_, stage, rd.stage_metrics(round_, stage), replayed=True)
            if stage == "promote" and round_ > last_round:
                self.deliver_round_end(rd.stage_metrics(round_, "promote"), replayed=True)
        ctx.round = saved_round

    def deliver_stage_end(self, round_: int, stage: str, metrics: dict[str, Any], replayed: bool = False) -> None:
        self.plugins.notify("selfloop_on_stage_end", ctx=self.ctx, stage=stage, metrics=metrics, replayed=replayed)
        self.run_dir.acknowledge(stage=[round_, stage])

    def deliver_round_end(self, record: dict[str, Any], replayed: bool = False) -> None:
        self.plugins.notify("selfloop_on_round_end", ctx=self.ctx, record=record, replayed=replayed)
        self.run_dir.acknowledge(round=record["round"])

    # -- one round -------------------------------------------------------------------------
    def run_round(self, round_: int) -> dict[str, Any]:
        ctx, rd = self.ctx, self.run_dir
        state = self.state()
        ctx.round, ctx.level = round_, state.level
        ctx.model = self.load_incumbent(state)
        self.plugins.notify("selfloop_on_round_start", ctx=ctx)
        if round_ == 0:
            self.stage("acquire", self.acquire_bootstrap)
        else:
            self.stage("acquire", self.acquire)
            self.stage("filter", self.filter)
        self.stage("optimize", self.optimize)
        self.stage("evaluate", self.evaluate)
        record = self.stage("promote", lambda: self.promote(state))
        rd.write_metrics_jsonl()
        self.deliver_round_end(record)
        return record

    def load_incumbent(self, state: LoopState):
        from selfloop.model import ModelHandle

        if state.incumbent_round is None:
            seed_everything(stage_seed(self.run.seed, 0, "model"))
            (provider,) = self.ctx.strategies["model"]
            culprit = describe(provider, "model", self.plugins.registry)
            with blame(culprit):
                handle = provider.build(self.ctx)
            if not isinstance(handle, ModelHandle):
                raise ContractError(f"{culprit} build() returned {type(handle).__name__}; expected a selfloop.model.ModelHandle")
            return handle
        return self.load_model(state.incumbent_round)

    def load_model(self, round_: int):
        self.run_dir.verify(round_, "optimize")
        return self.ctx.reload_model(self.run_dir.stage_dir(round_, "optimize") / "model")

    def stage(self, name: str, compute: Callable[[], tuple[dict[str, Any], Callable | None]]) -> dict[str, Any]:
        """Run one stage unless already complete; write outputs atomically; return metrics."""
        ctx, rd = self.ctx, self.run_dir
        if rd.is_complete(ctx.round, name):
            return rd.stage_metrics(ctx.round, name)
        seed = stage_seed(self.run.seed, ctx.round, name)
        seed_everything(seed)
        ctx.stage, ctx.rng = name, random.Random(seed)
        self.plugins.notify("selfloop_on_stage_start", ctx=ctx, stage=name)
        started, before = time.monotonic(), ctx.budget.snapshot()
        ctx.notes, ctx.row_errors, ctx.artifacts = {}, [], {}
        try:
            metrics, write = compute()
        finally:
            ctx.stage = ""
        write = _with_artifacts(write, dict(ctx.artifacts))
        if ctx.notes:
            metrics["notes"] = ctx.notes
        errors = self.check_row_errors(name, metrics)
        spent = {k: v - before[k] for k, v in ctx.budget.snapshot().items()}
        metrics = {
            "round": ctx.round,
            "stage": name,
            "level": ctx.level,
            **metrics,
            "seconds": round(time.monotonic() - started, 2),
            # counters that moved (a stage that generated nothing carries no generated_tokens: 0)
            **{k: (round(v) if k != "flops" else float(f"{v:.4g}")) for k, v in spent.items() if v},
        }
        rd.write_stage(ctx.round, name, metrics, write, errors)
        self.echo(_summary(ctx.round, name, metrics))
        self.deliver_stage_end(ctx.round, name, metrics)
        if ctx.stop_reason:  # a guard asked (in the stage or an observer): stop before the next stage
            raise StopRequested(ctx.stop_reason)
        return metrics

    def check_row_errors(self, stage: str, metrics: dict[str, Any]) -> list[dict[str, str]]:
        """Count the rows strategies could not process; fail past loop.max_row_error_share."""
        errors = self.ctx.row_errors
        if not errors:
            return []
        by_strategy = Counter(e["strategy"] for e in errors)
        metrics["row_errors"] = dict(by_strategy)
        stage_rows = {"acquire": metrics.get("rows", 0) + len(errors), "filter": metrics.get("acquired", 0), "optimize": metrics.get("rows", 0)}.get(stage)
        limit = self.run.loop.max_row_error_share
        for strategy, count in by_strategy.items():
            # the rows the strategy saw: its own count (ctx.record(name, rows=n), e.g. an evaluator's
            # probes) or the stage's
            rows = (self.ctx.notes.get(strategy) or {}).get("rows") or stage_rows
            if rows and count / rows > limit:
                reasons = Counter(e["reason"] for e in errors if e["strategy"] == strategy).most_common(3)
                raise SelfloopError(
                    f"{strategy} could not process {count} of {rows} rows in round {self.ctx.round}'s {stage} "
                    f"(more than loop.max_row_error_share={limit}); most common: " + "; ".join(f"{r} ({n}x)" for r, n in reasons)
                )
        return errors

    def load_data(self, stage: str):
        self.run_dir.verify(self.ctx.round, stage)
        return contract.conform(contract.load(self.run_dir.stage_dir(self.ctx.round, stage) / "data"))

    # -- stages ----------------------------------------------------------------------------
    def acquire_bootstrap(self):
        ctx, boot = self.ctx, self.run.loop.bootstrap
        per_level = _split(boot.n_problems, len(boot.levels))
        sample = getattr(ctx.task, "sample_labelled", None) or ctx.task.sample
        rows = []
        for level, n in zip(boot.levels, per_level):
            for i, p in enumerate(sample(ctx.rng, level, n)):
                rows.append(dict(id=f"r000-L{level}-{i}", prompt=p.prompt, completions=[], answer=p.reference, reference=p.reference, difficulty=level, round=0, source="bootstrap"))
        unlabelled = [r["id"] for r in rows if r["answer"] is None]
        if unlabelled:
            raise SelfloopError(f"task {ctx.task.name!r} gave {len(unlabelled)} bootstrap problems without a reference (e.g. {unlabelled[0]}); the bootstrap trains on references")
        data = contract.make_rows(rows)
        if not len(data):
            raise SelfloopError(f"task {ctx.task.name!r} gave no bootstrap problems at levels {boot.levels}")
        metrics = {"rows": len(data), "labels_used": len(data), "by_level": _count_levels(data)}
        return metrics, _saver(data)

    def acquire(self):
        ctx = self.ctx
        parts = []
        for acquirer in ctx.strategies["acquire"]:
            culprit = describe(acquirer, "acquire", self.plugins.registry)
            with blame(culprit):
                acquired = acquirer.acquire(ctx)
            parts.append(contract.check_dataset(acquired, culprit))
        data = contract.concat(parts)
        contract.check_dataset(data, "the acquirers together")
        metrics = {"rows": len(data), "by_level": _count_levels(data), "label_precision": self.precision(data)}
        return metrics, _saver(data)

    def filter(self):
        ctx = self.ctx
        acquired = self.load_data("acquire")
        refs = dict(zip(acquired["id"], acquired["reference"]))
        data = contract.blind(acquired)
        steps = []
        for strategy in ctx.strategies["filter"]:
            before = data
            culprit = describe(strategy, "filter", self.plugins.registry)
            with blame(culprit):
                kept = strategy.filter(ctx, data)
            data = contract.check_filtered(before, kept, culprit, f"score_{strategy.name}")
            kept_ids = set(data["id"])
            dropped = [i for i in before["id"] if i not in kept_ids]
            steps.append({
                "filter": strategy.name,
                "kept": len(data),
                "of": len(before),
                # meta-evaluation: how right were the labels this filter kept, and those it dropped
                "precision_kept": self.precision(data, refs),
                "precision_dropped": self.precision_of(dict(zip(before["id"], before["answer"])), dropped, refs),
            })
        at_level = sum(1 for d in acquired["difficulty"] if d == ctx.level)
        kept_at_level = sum(1 for d in data["difficulty"] if d == ctx.level)
        metrics = {
            "acquired": len(acquired),
            "kept": len(data),
            "kept_fraction": len(data) / len(acquired) if len(acquired) else 0.0,
            "kept_fraction_at_level": kept_at_level / at_level if at_level else 0.0,
            "filters": steps,
            "label_precision": self.precision(data, refs),
        }
        return metrics, _saver(data)

    def optimize(self):
        from selfloop.model import ModelHandle

        ctx, loop = self.ctx, self.run.loop
        bootstrap = ctx.round == 0
        data = self.load_data("acquire" if bootstrap else "filter")
        if not bootstrap and not len(data):
            filtered = self.run_dir.stage_metrics(ctx.round, "filter")
            funnel = " → ".join(f"{s['filter']} {s['kept']}/{s['of']}" for s in filtered["filters"])
            return self.starved(f"the filters kept 0 of {filtered['acquired']} acquired rows ({funnel or 'no filter'})")
        labels_used = len(data) if bootstrap else 0
        if loop.allow_references_in_training and not bootstrap:
            acquired = self.load_data("acquire")
            refs = dict(zip(acquired["id"], acquired["reference"]))
            data = data.add_column("reference", [refs.get(i) for i in data["id"]])
            labels_used = sum(r is not None for r in data["reference"])
        else:
            data = contract.blind(data)  # the label guard: optimizers never see references
        (name,) = selected(self.cfg, "optimize")
        overrides = dict(loop.bootstrap.optimize.get(name) or {}) if bootstrap else None
        (optimizer,) = instantiate(self.plugins.registry, self.cfg, "optimize", overrides)
        ctx.strategies["optimize"] = [optimizer]
        culprit = describe(optimizer, "optimize", self.plugins.registry)
        try:
            with blame(culprit):
                candidate = optimizer.optimize(ctx, data)
        except StarvedRound as exc:
            if bootstrap:
                raise SelfloopError(f"{culprit} found nothing to train on in the bootstrap: {exc}") from None
            return self.starved(f"{culprit}: {exc}")
        if not isinstance(candidate, ModelHandle):
            raise ContractError(f"{culprit} returned {type(candidate).__name__}; expected a selfloop.model.ModelHandle")
        if candidate is ctx.model and not bootstrap:
            raise ContractError(f"{culprit} returned the incumbent itself; train and return a new candidate (ModelHandle.clone())")
        metrics = {"rows": len(data), "labels_used": labels_used, "parameters": candidate.num_parameters, **candidate.train_metrics}
        return metrics, lambda tmp: candidate.save(tmp / "model")

    def starved(self, reason: str):
        self.ctx.warn("loop", f"round {self.ctx.round} is starved: {reason}; nothing is trained or promoted")
        return {"rows": 0, "labels_used": 0, "starved": reason}, None

    def evaluate(self):
        ctx = self.ctx
        optimized = self.run_dir.stage_metrics(ctx.round, "optimize")
        if optimized.get("starved"):
            return {"evaluators": {}, "skipped": "starved round: no candidate"}, None
        candidate = self.load_model(ctx.round)
        results = ctx.evaluation = {}  # evaluators later in the list see earlier ones' results (meta)
        for evaluator in ctx.strategies["evaluate"]:
            culprit = describe(evaluator, "evaluate", self.plugins.registry)
            with blame(culprit):
                out = evaluator.evaluate(ctx, candidate)
            if not isinstance(out, dict) or not _finite_number(out.get("score")):
                raise ContractError(f"{culprit} evaluate() returned {out!r}; expected a dict with a finite numeric 'score'")
            if "by_level" in out:
                out["by_level"] = _by_level(out["by_level"], culprit)
            results[evaluator.name] = {**out, "uses_references": bool(getattr(evaluator, "uses_references", False))}
        return {"evaluators": results}, None

    def promote(self, state: LoopState):
        ctx, rd, loop = self.ctx, self.run_dir, self.run.loop
        round_ = ctx.round
        stages = {s: rd.stage_metrics(round_, s) for s in ("acquire", "filter", "optimize", "evaluate") if rd.is_complete(round_, s)}
        starved = stages["optimize"].get("starved")
        evaluation = stages["evaluate"]["evaluators"]
        autonomous = {n: r["score"] for n, r in evaluation.items() if not r["uses_references"]}
        gate: dict[str, dict[str, float]] = {}
        if round_ == 0:
            promoted, reason = True, "bootstrap"
        elif starved:
            promoted, reason = False, f"starved: {starved}"
        else:
            previous = rd.stage_metrics(state.incumbent_round, "evaluate")["evaluators"]
            for n in autonomous:
                if n in previous:
                    cand, inc = gate_scores(evaluation[n], previous[n], state.level)
                    gate[n] = {"candidate": cand, "incumbent": inc}
            tolerance = loop.promotion.tolerance
            worse = [n for n, g in gate.items() if g["candidate"] < g["incumbent"] - tolerance]
            vetoes = self.vetoes(evaluation, previous)
            promoted = not worse and not vetoes
            lower = [n for n, g in gate.items() if g["candidate"] < g["incumbent"] and n not in worse]
            if not promoted:
                reason = "; ".join([f"worse on {', '.join(worse)} by more than loop.promotion.tolerance={tolerance}"] * bool(worse) + vetoes)
            elif lower:
                reason = f"lower on {', '.join(lower)} but within loop.promotion.tolerance={tolerance}"
            else:
                reason = "no autonomous evaluator got worse"
        labels = stages["optimize"]["labels_used"]
        filt, acq = stages.get("filter"), stages["acquire"]
        next_level = self.next_level(state.level, round_, promoted, filt)
        incumbent_round = round_ if promoted else state.incumbent_round
        shown = evaluation if promoted else rd.stage_metrics(incumbent_round, "evaluate")["evaluators"]
        meta = {n: r.get("by_level", {}) for n, r in shown.items() if r["uses_references"]}
        warnings = [f"{s}/{strategy}: {w}" for s, m in stages.items() for strategy, note in (m.get("notes") or {}).items() for w in note.get("warnings", [])]
        record = {
            "round": round_,
            "level": None if round_ == 0 else state.level,
            "labels_used": labels,
            "labelled_levels": sorted(int(k) for k in acq["by_level"]) if labels else [],
            "acquired": acq["rows"],
            "kept": filt["kept"] if filt else acq["rows"],
            "kept_fraction": filt["kept_fraction"] if filt else 1.0,
            "label_precision_acquired": acq.get("label_precision"),
            "label_precision_kept": filt["label_precision"] if filt else 1.0,
            # rows in and out of each filter, with the label precision of what it kept and dropped
            "funnel": filt["filters"] if filt else [],
            "autonomous": autonomous,
            # per label-free evaluator, on the levels reached so far
            "gate": gate,
            "promoted": promoted,
            "starved": bool(starved),
            "reason": reason,
            "incumbent_round": incumbent_round,
            "next_level": next_level,
            # ground truth, reported only (meta-evaluation of the loop); never fed back
            "meta": meta,
            "frontier": frontier(meta),
            "candidate_meta": {n: r.get("by_level", {}) for n, r in evaluation.items() if r["uses_references"]},
            # compute spent on the round (the promote stage adds its own seconds)
            "compute": {k: v for k, v in ((k, round(sum(m.get(k, 0) for m in stages.values()), 2)) for k in COMPUTE_KEYS) if v or k == "seconds"},
            "row_errors": sum(sum((m.get("row_errors") or {}).values()) for m in stages.values()),
            "warnings": warnings,
        }
        if not record["row_errors"]:
            del record["row_errors"]
        return record, None

    def vetoes(self, candidate: dict[str, Any], incumbent: dict[str, Any]) -> list[str]:
        """Reasons to refuse promotion from evaluators with a ``veto(candidate_result,
        incumbent_result)`` method (e.g. a safety gate), whatever the other scores say."""
        out = []
        for evaluator in self.ctx.strategies["evaluate"]:
            veto = getattr(evaluator, "veto", None)
            if callable(veto) and evaluator.name in candidate:
                culprit = describe(evaluator, "evaluate", self.plugins.registry)
                with blame(culprit):
                    said = veto(candidate[evaluator.name], incumbent.get(evaluator.name))
                if said:
                    out.append(f"vetoed by {evaluator.name}: {said}")
        return out

    def next_level(self, level: int, round_: int, promoted: bool, filt: dict | None) -> int:
        cur = self.run.loop.curriculum
        if round_ == 0:
            return cur.start_level
        if cur.advance == Advance.fixed:
            at_level = 1 + sum(1 for r in self.run_dir.records() if r["round"] > 0 and r.get("level") == level and r["round"] < round_)
            ready = at_level >= cur.every_rounds
        else:
            ready = promoted and (cur.advance == Advance.always or (filt is not None and filt["kept_fraction_at_level"] >= cur.min_kept_fraction))
        levels = list(self.ctx.task.levels)
        top = min(cur.max_level or levels[-1], levels[-1])
        above = [v for v in levels if level < v <= top]
        return above[min(cur.step, len(above)) - 1] if ready and above else level

    def precision(self, data, refs: dict[str, str | None] | None = None) -> float | None:
        """Share of pseudo-labels that match ground truth (meta-evaluation, never fed back)."""
        refs = refs if refs is not None else dict(zip(data["id"], data["reference"]))
        return self.precision_of(dict(zip(data["id"], data["answer"])), list(data["id"]), refs)

    def precision_of(self, answers: dict[str, str], ids: list[str], refs: dict[str, str | None]) -> float | None:
        task = self.ctx.task
        checked = [task.check(answers[i], refs[i]) for i in ids if refs.get(i) is not None]
        return sum(checked) / len(checked) if checked else None


COMPUTE_KEYS = ("seconds", "generated_sequences", "generated_tokens", "train_steps", "train_tokens", "flops")


def frontier(meta: dict[str, dict[str, float]]) -> int | None:
    """The highest level at which ground-truth exact match is >= 0.9 (meta-evaluation only),
    from the first reference-using evaluator with per-level scores."""
    for by_level in meta.values():
        if by_level:
            mastered = [int(k) for k, v in by_level.items() if v >= FRONTIER_ACCURACY]
            return max(mastered) if mastered else None
    return None


def gate_scores(candidate: dict[str, Any], incumbent: dict[str, Any], level: int) -> tuple[float, float]:
    """Candidate and incumbent scores for the promotion gate: the mean over the levels both
    measured that the curriculum has reached (``<= level``) when the evaluator reports
    ``by_level`` (agreement on levels far beyond reach is noise); else the overall score."""
    cand, inc = candidate.get("by_level") or {}, incumbent.get("by_level") or {}
    common = [k for k in cand if k in inc and int(k) <= level]
    if not common:
        return candidate["score"], incumbent["score"]
    return sum(cand[k] for k in common) / len(common), sum(inc[k] for k in common) / len(common)


def _finite_number(x: Any) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _by_level(by_level: Any, culprit: str) -> dict[str, float]:
    if not isinstance(by_level, dict) or not all(_finite_number(v) for v in by_level.values()):
        raise ContractError(f"{culprit} evaluate() returned by_level={by_level!r}; expected {{level: finite number}}")
    try:
        return {str(k): by_level[k] for k in sorted(by_level, key=int)}
    except ValueError:
        raise ContractError(f"{culprit} evaluate() returned by_level keys {list(by_level)}; expected difficulty levels") from None


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _count_levels(data) -> dict[str, int]:
    counts = Counter(str(d) for d in data["difficulty"])
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def _with_artifacts(write: Callable | None, artifacts: dict[str, bytes]) -> Callable | None:
    if not artifacts:
        return write

    def write_all(tmp):
        if write is not None:
            write(tmp)
        for rel, content in artifacts.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    return write_all


def _saver(data):
    return lambda tmp: contract.save(data, tmp / "data")


def _summary(round_: int, stage: str, m: dict[str, Any]) -> str:
    head = f"round {round_} · {stage:<8}"
    if stage == "acquire":
        extra = f"{m['rows']} rows" + (f", {m['labels_used']} labelled (bootstrap)" if m.get("labels_used") else "")
    elif stage == "filter":
        extra = f"kept {m['kept']}/{m['acquired']} ({m['kept_fraction']:.0%})" + "".join(f" · {s['filter']} {s['kept']}/{s['of']}" for s in m["filters"])
    elif stage == "optimize":
        extra = f"STARVED: {m['starved']}" if m.get("starved") else f"trained on {m['rows']} rows"
    elif stage == "evaluate":
        extra = m.get("skipped") or ", ".join(f"{n}={r['score']:.3f}{' (meta)' if r['uses_references'] else ''}" for n, r in m["evaluators"].items())
    else:
        extra = ("promoted" if m["promoted"] else "rejected") + f" ({m['reason']}); next level {m['next_level']}"
        if m.get("frontier") is not None:
            extra += f"; frontier {m['frontier']}"
    errors = m.get("row_errors")
    if errors:
        extra += f" · rows not processed: {sum(errors.values()) if isinstance(errors, dict) else errors}"
    return f"{head} {extra}  [{m['seconds']:.1f}s]"
