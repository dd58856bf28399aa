"""The loop: rounds of acquire -> filter -> optimize -> evaluate -> promote.

Round 0 is the bootstrap: the task's easy levels with references (the run's only labels,
counted) train the model built by the model provider. Every later round labels harder
problems with the incumbent model and trains a candidate on what the filters keep; the
candidate replaces the incumbent only if no autonomous evaluator scores it worse.

Each stage reads its inputs from the run directory and writes its outputs there
atomically, with a seed derived from (seed, round, stage): a killed run resumes at the
first incomplete stage and reaches the same result as an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig

from selfloop import data as contract
from selfloop.config import Advance, RunConfig, check_known, instantiate, selected, strategy_config, validate_run_config
from selfloop.context import BudgetMeter, RunContext, seed_everything, stage_seed
from selfloop.errors import ContractError, add_note, blame
from selfloop.model import ModelHandle, resolve_device
from selfloop.plugins import Plugins
from selfloop.registry import STAGES
from selfloop.rundir import RunDir, package_versions


@dataclass
class LoopState:
    """What the next round starts from, derived from finished rounds' records."""

    level: int
    incumbent_round: int | None  # whose optimize/model is the incumbent (None: before bootstrap)


def describe(strategy: Any, kind: str, plugins: Plugins) -> str:
    return plugins.registry.describe(kind, strategy.name)


class Loop:
    def __init__(self, cfg: DictConfig, run_dir: RunDir, plugins: Plugins, echo: Callable[[str], None] = print):
        check_known(plugins.registry, cfg)
        self.cfg = cfg
        self.run: RunConfig = validate_run_config(cfg)
        self.run_dir = run_dir
        self.plugins = plugins
        self.echo = echo
        registry = plugins.registry
        (task,) = instantiate(registry, cfg, "task")
        strategies = {kind: instantiate(registry, cfg, kind) for kind in ("model", *STAGES)}
        # round 0's option overrides too, so a typo fails now rather than after the run began
        (optimizer,) = selected(cfg, "optimize")
        strategy_config(registry, "optimize", optimizer, cfg.optimize[optimizer], dict(self.run.loop.bootstrap.optimize.get(optimizer) or {}))
        self.ctx = RunContext(
            cfg=cfg,
            run=self.run,
            run_dir=run_dir,
            registry=registry,
            hook=plugins.hook,
            task=task,
            strategies=strategies,
            device=str(resolve_device(self.run.device)),
            budget=BudgetMeter(self.run.loop.max_minutes),
        )

    # -- the whole run ---------------------------------------------------------------------
    def execute(self) -> str:
        """Run (or resume) every round; return the final status."""
        rd, ctx, notify = self.run_dir, self.ctx, self.plugins.notify
        removed = rd.clean_partial()
        if removed:
            self.echo(f"resume: removed {len(removed)} half-written stage(s): {', '.join(p.name for p in removed)}")
        rd.write_run_json(
            status="running",
            seed=self.run.seed,
            versions=package_versions(),
            plugins={n: {"distribution": i.distribution, "version": i.version, "hooks": i.hooks} for n, i in self.plugins.info.items() if not i.error},
        )
        status = "failed"
        try:
            notify("selfloop_on_run_start", ctx=ctx)
            for round_ in range(self.run.loop.rounds + 1):
                if rd.is_complete(round_, "promote"):
                    continue
                if ctx.budget.exhausted():
                    self.echo(f"budget: {ctx.budget.elapsed_minutes:.1f} min used of loop.max_minutes={self.run.loop.max_minutes}; stopping")
                    status = "budget_exhausted"
                    break
                self.run_round(round_)
            else:
                status = "completed"
        except BaseException as exc:
            rd.write_run_json(status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted", error=f"{type(exc).__name__}: {exc}")
            try:  # every observer that saw the start sees the end, e.g. to close its files
                notify("selfloop_on_run_end", ctx=ctx, status="failed")
            except Exception as also:  # the run's own error is the one to report
                add_note(exc, f"selfloop_on_run_end failed too: {type(also).__name__}: {also}")
            raise
        rd.write_run_json(status=status, error=None)
        notify("selfloop_on_run_end", ctx=ctx, status=status)
        return status

    def state(self) -> LoopState:
        records = self.run_dir.records()
        if not records:
            return LoopState(level=self.run.loop.curriculum.start_level, incumbent_round=None)
        last = records[-1]
        return LoopState(level=last["next_level"], incumbent_round=last["incumbent_round"])

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
        self.plugins.notify("selfloop_on_round_end", ctx=ctx, record=record)
        return record

    def load_incumbent(self, state: LoopState):
        if state.incumbent_round is None:
            seed_everything(stage_seed(self.run.seed, 0, "model"))
            (provider,) = self.ctx.strategies["model"]
            culprit = describe(provider, "model", self.plugins)
            with blame(culprit):
                handle = provider.build(self.ctx)
            if not isinstance(handle, ModelHandle):
                raise ContractError(f"{culprit} build() returned {type(handle).__name__}; expected a selfloop.model.ModelHandle")
            return handle
        return ModelHandle.load(self.run_dir.stage_dir(state.incumbent_round, "optimize") / "model", device=self.ctx.device)

    def stage(self, name: str, compute: Callable[[], tuple[dict[str, Any], Callable | None]]) -> dict[str, Any]:
        """Run one stage unless already complete; write outputs atomically; return metrics."""
        ctx, rd = self.ctx, self.run_dir
        if rd.is_complete(ctx.round, name):
            return rd.stage_metrics(ctx.round, name)
        seed = stage_seed(self.run.seed, ctx.round, name)
        seed_everything(seed)
        ctx.stage, ctx.rng = name, random.Random(seed)
        self.plugins.notify("selfloop_on_stage_start", ctx=ctx, stage=name)
        started, budget = time.monotonic(), ctx.budget
        generated, steps = ModelHandle.generated_sequences, budget.train_steps
        ctx.notes = {}
        metrics, write = compute()
        if ctx.notes:
            metrics["notes"] = ctx.notes
        metrics = {
            "round": ctx.round,
            "stage": name,
            "level": ctx.level,
            **metrics,
            "seconds": round(time.monotonic() - started, 2),
            "generated_sequences": ModelHandle.generated_sequences - generated,
            "train_steps": budget.train_steps - steps,
        }
        rd.write_stage(ctx.round, name, metrics, write)
        self.echo(_summary(ctx.round, name, metrics))
        self.plugins.notify("selfloop_on_stage_end", ctx=ctx, stage=name, metrics=metrics)
        return metrics

    def load_data(self, stage: str):
        return contract.load(self.run_dir.stage_dir(self.ctx.round, stage) / "data")

    # -- stages ----------------------------------------------------------------------------
    def acquire_bootstrap(self):
        ctx, boot = self.ctx, self.run.loop.bootstrap
        per_level = _split(boot.n_problems, len(boot.levels))
        rows = []
        for level, n in zip(boot.levels, per_level):
            for i, p in enumerate(ctx.task.sample(ctx.rng, level, n)):
                rows.append(dict(id=f"r000-L{level}-{i}", prompt=p.prompt, completions=[], answer=p.reference, reference=p.reference, difficulty=level, round=0, source="bootstrap"))
        data = contract.make_rows(rows)
        metrics = {"rows": len(data), "labels_used": len(data), "by_level": _count_levels(data)}
        return metrics, _saver(data)

    def acquire(self):
        ctx = self.ctx
        parts = []
        for acquirer in ctx.strategies["acquire"]:
            culprit = describe(acquirer, "acquire", self.plugins)
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
        data = contract.blind(acquired)
        steps = []
        for strategy in ctx.strategies["filter"]:
            before = len(data)
            culprit = describe(strategy, "filter", self.plugins)
            with blame(culprit):
                kept = strategy.filter(ctx, data)
            data = contract.check_filtered(data, kept, culprit, f"score_{strategy.name}")
            steps.append({"filter": strategy.name, "kept": len(data), "of": before})
        refs = dict(zip(acquired["id"], acquired["reference"]))
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
        ctx, loop = self.ctx, self.run.loop
        bootstrap = ctx.round == 0
        data = self.load_data("acquire" if bootstrap else "filter")
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
        culprit = describe(optimizer, "optimize", self.plugins)
        with blame(culprit):
            candidate = optimizer.optimize(ctx, data)
        if not isinstance(candidate, ModelHandle):
            raise ContractError(f"{culprit} returned {type(candidate).__name__}; expected a selfloop.model.ModelHandle")
        if candidate is ctx.model and not bootstrap:
            raise ContractError(f"{culprit} returned the incumbent itself; train and return a new candidate (ModelHandle.clone())")
        metrics = {"rows": len(data), "labels_used": labels_used, "parameters": candidate.num_parameters, **candidate.train_metrics}
        return metrics, lambda tmp: candidate.save(tmp / "model")

    def evaluate(self):
        ctx = self.ctx
        candidate = ModelHandle.load(self.run_dir.stage_dir(ctx.round, "optimize") / "model", device=ctx.device)
        results = {}
        for evaluator in ctx.strategies["evaluate"]:
            culprit = describe(evaluator, "evaluate", self.plugins)
            with blame(culprit):
                out = evaluator.evaluate(ctx, candidate)
            if not isinstance(out, dict) or not isinstance(out.get("score"), (int, float)):
                raise ContractError(f"{culprit} evaluate() returned {out!r}; expected a dict with a numeric 'score'")
            results[evaluator.name] = {**out, "uses_references": bool(getattr(evaluator, "uses_references", False))}
        return {"evaluators": results}, None

    def promote(self, state: LoopState):
        ctx, rd, loop = self.ctx, self.run_dir, self.run.loop
        round_ = ctx.round
        stages = {s: rd.stage_metrics(round_, s) for s in ("acquire", "filter", "optimize", "evaluate") if rd.is_complete(round_, s)}
        evaluation = stages["evaluate"]["evaluators"]
        autonomous = {n: r["score"] for n, r in evaluation.items() if not r["uses_references"]}
        gate: dict[str, list[float]] = {}
        if round_ == 0:
            promoted, reason = True, "bootstrap"
        else:
            previous = rd.stage_metrics(state.incumbent_round, "evaluate")["evaluators"]
            gate = {n: [gate_score(evaluation[n], state.level), gate_score(previous[n], state.level)] for n in autonomous if n in previous}
            worse = [n for n, (cand, inc) in gate.items() if cand < inc - loop.promotion.tolerance]
            promoted = not worse
            reason = "no autonomous evaluator got worse" if promoted else f"worse on {', '.join(worse)}"
        labels = stages["optimize"]["labels_used"]
        filt, acq = stages.get("filter"), stages["acquire"]
        next_level = self.next_level(state.level, round_, promoted, filt)
        incumbent_round = round_ if promoted else state.incumbent_round
        shown = evaluation if promoted else rd.stage_metrics(incumbent_round, "evaluate")["evaluators"]
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
            "autonomous": autonomous,
            # [candidate, incumbent] per label-free evaluator, on the levels reached so far
            "gate": gate,
            "promoted": promoted,
            "reason": reason,
            "incumbent_round": incumbent_round,
            "next_level": next_level,
            # ground truth, reported only (meta-evaluation of the loop); never fed back
            "meta": {n: r.get("by_level", {}) for n, r in shown.items() if r["uses_references"]},
            "candidate_meta": {n: r.get("by_level", {}) for n, r in evaluation.items() if r["uses_references"]},
            # compute spent on the round (the promote stage adds its own seconds)
            "compute": {k: round(sum(m.get(k, 0) for m in stages.values()), 2) for k in ("seconds", "generated_sequences", "train_steps")},
        }
        return record, None

    def next_level(self, level: int, round_: int, promoted: bool, filt: dict | None) -> int:
        cur = self.run.loop.curriculum
        if round_ == 0:
            return cur.start_level
        ready = cur.advance == Advance.always or (filt is not None and filt["kept_fraction_at_level"] >= cur.min_kept_fraction)
        top = min(cur.max_level or max(self.ctx.task.levels), max(self.ctx.task.levels))
        return min(level + 1, top) if promoted and ready else level

    def precision(self, data, refs: dict[str, str | None] | None = None) -> float | None:
        """Share of pseudo-labels that match ground truth (meta-evaluation, never fed back)."""
        task = self.ctx.task
        refs = refs if refs is not None else dict(zip(data["id"], data["reference"]))
        checked = [task.check(a, refs[i]) for i, a in zip(data["id"], data["answer"]) if refs.get(i) is not None]
        return sum(checked) / len(checked) if checked else None


def gate_score(result: dict[str, Any], level: int) -> float:
    """An evaluator's score for the promotion gate: the mean over the difficulty levels the
    curriculum has reached (``by_level`` keys <= level) when it reports per-level scores, so
    noise on levels far beyond the model's reach cannot decide; else its overall score."""
    by_level = result.get("by_level") or {}
    reached = [v for k, v in by_level.items() if int(k) <= level]
    return sum(reached) / len(reached) if reached else result["score"]


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _count_levels(data) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in data["difficulty"]:
        counts[str(d)] = counts.get(str(d), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def _saver(data):
    return lambda tmp: contract.save(data, tmp / "data")


def _summary(round_: int, stage: str, m: dict[str, Any]) -> str:
    head = f"round {round_} · {stage:<8}"
    if stage == "acquire":
        extra = f"{m['rows']} rows" + (f", {m['labels_used']} labelled (bootstrap)" if m.get("labels_used") else "")
    elif stage == "filter":
        extra = f"kept {m['kept']}/{m['acquired']} ({m['kept_fraction']:.0%})"
    elif stage == "optimize":
        extra = f"trained on {m['rows']} rows"
    elif stage == "evaluate":
        extra = ", ".join(f"{n}={r['score']:.3f}{' (meta)' if r['uses_references'] else ''}" for n, r in m["evaluators"].items())
    else:
        extra = ("promoted" if m["promoted"] else "rejected") + f" ({m['reason']}); next level {m['next_level']}"
    return f"{head} {extra}  [{m['seconds']:.1f}s]"
