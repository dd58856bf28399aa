"""Contract suites: one class per stage; subclass it and provide a ``strategy`` fixture.

Each suite checks what the loop relies on (types, shapes, determinism, the label-free
guarantee) using the same checks the loop itself applies, on real data from a smoke-size
run context. Tune a suite with class attributes::

    class TestMyFilter(FilterContract):
        overrides = ["task=addition"]   # Hydra overrides for the context the strategy runs in
        level = 4                        # the curriculum level of that context

        @pytest.fixture
        def strategy(self):
            return MyFilter(MyFilter.Config())

and override the ``rows`` fixture to feed a strategy data of its own.
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar

import pytest

from selfloop.registry import SINGLE_CHOICE, Registry
from selfloop.strategy import Generation, Problem


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reseed(ctx, seed: int = 0) -> None:
    from selfloop.context import seed_everything

    seed_everything(seed)
    ctx.rng = random.Random(seed)


class StrategyContract:
    """What every registered class must satisfy: a valid registration and a Config that
    Hydra can compose and round-trip."""

    pytestmark = pytest.mark.selfloop_contract

    kind: ClassVar[str] = ""
    #: Hydra overrides for the smoke-size run context the strategy is tested in
    overrides: ClassVar[list[str]] = []
    #: the curriculum level of that context
    level: ClassVar[int] = 4
    #: whether the context carries an (untrained) initial model in ``ctx.model``
    needs_model: ClassVar[bool] = False

    @pytest.fixture
    def strategy(self):
        pytest.fail(f"{type(self).__name__}: define a `strategy` fixture that returns a configured instance to test")

    @pytest.fixture
    def plugins(self, strategy, selfloop_register):
        return selfloop_register(type(strategy), kind=self.kind)

    @pytest.fixture
    def ctx(self, plugins, selfloop_ctx):
        return selfloop_ctx(self.overrides, plugins, level=self.level, with_model=self.needs_model)

    def culprit(self, strategy) -> str:
        return f"{self.kind} {strategy.name!r} ({type(strategy).__name__})"

    def test_registration_is_valid(self, strategy):
        Registry().add(self.kind, type(strategy), "contract")  # raises PluginError naming the problem

    def test_options_compose_as_hydra_config(self, strategy, plugins, selfloop_compose):
        from omegaconf import OmegaConf

        from selfloop.config import strategy_config

        name = strategy.name
        selection = f"{self.kind}={name}" if self.kind in SINGLE_CHOICE else f"{self.kind}=[{name}]"
        cfg = selfloop_compose([*self.overrides, selection], plugins)
        config = strategy_config(plugins.registry, self.kind, name, cfg[self.kind][name])
        assert isinstance(config, type(strategy).Config)
        # the instance's own config survives a trip through OmegaConf (what a run directory saves)
        again = OmegaConf.to_object(OmegaConf.structured(strategy.config))
        assert again == strategy.config, "the strategy's config does not round-trip through OmegaConf"


# -- tasks and models ----------------------------------------------------------------------
class TaskContract(StrategyContract):
    kind = "task"
    #: how many problems per level the sampling checks draw
    n_problems: ClassVar[int] = 20

    def levels_under_test(self, task) -> list[int]:
        return list(task.levels)[:3]

    def test_levels_are_ascending_integers(self, strategy):
        levels = list(strategy.levels)
        assert levels, "a task needs at least one difficulty level"
        assert all(isinstance(v, int) for v in levels) and levels == sorted(set(levels))

    def test_samples_problems_of_the_requested_level(self, strategy):
        for level in self.levels_under_test(strategy):
            problems = strategy.sample(random.Random(level), level, self.n_problems)
            assert len(problems) == self.n_problems
            for p in problems:
                assert isinstance(p, Problem) and p.difficulty == level
                assert isinstance(p.prompt, str) and p.prompt
                assert p.reference is None or isinstance(p.reference, str)

    def test_sampling_is_seeded(self, strategy):
        level = self.levels_under_test(strategy)[-1]
        assert strategy.sample(random.Random(7), level, 10) == strategy.sample(random.Random(7), level, 10)

    def test_references_pass_the_checks(self, strategy):
        for level in self.levels_under_test(strategy):
            for p in strategy.sample(random.Random(level), level, self.n_problems):
                if p.reference is None:
                    continue
                assert strategy.check(p.reference, p.reference), f"check() rejects the reference of {p.prompt!r}"
                assert strategy.is_well_formed(p.prompt, p.reference), f"is_well_formed() rejects the reference of {p.prompt!r}"

    def test_alphabet_covers_prompts_and_answers(self, strategy):
        alphabet = strategy.alphabet
        if alphabet is None:
            pytest.skip("free-text task: no alphabet")
        for level in self.levels_under_test(strategy):
            for p in strategy.sample(random.Random(level), level, self.n_problems):
                text = p.prompt + (p.reference or "")
                missing = set(text) - set(alphabet)
                assert not missing, f"characters {sorted(missing)} of {p.prompt!r} are not in the task's alphabet"
                assert strategy.max_new_tokens(level) >= len(p.reference or ""), "max_new_tokens cuts answers short"


class ModelProviderContract(StrategyContract):
    kind = "model"

    def test_builds_a_model_that_generates_and_round_trips(self, strategy, ctx, tmp_path):
        from selfloop.model import ModelHandle

        handle = strategy.build(ctx)
        assert isinstance(handle, ModelHandle), f"{self.culprit(strategy)} build() returned {type(handle).__name__}"
        prompts = [p.prompt for p in ctx.task.sample(random.Random(0), ctx.task.levels[0], 3)]
        outs = handle.generate(prompts, n=2, temperature=0.7, max_new_tokens=4)
        assert len(outs) == 3 and all(len(o) == 2 and all(isinstance(c, str) for c in o) for o in outs)
        handle.save(tmp_path / "model")
        again = ModelHandle.load(tmp_path / "model", device="cpu")
        greedy = dict(max_new_tokens=4)
        assert again.generate(prompts, **greedy) == handle.generate(prompts, **greedy)


# -- the four stages -----------------------------------------------------------------------
def sample_rows(ctx, n: int, levels: list[int], with_references: bool, correct_share: float = 0.5):
    """Rows like an acquirer's: some answers right, the rest another problem's answer."""
    from selfloop.data import blind, make_rows

    problems = [p for level in levels for p in ctx.task.sample(random.Random(level), level, n // len(levels))]
    rows = []
    for i, p in enumerate(problems):
        right = i < len(problems) * correct_share
        answer = p.reference if right else problems[(i + 1) % len(problems)].reference
        answer = answer if answer is not None else ""
        completions = [answer] * 4 if right else [answer, p.reference or "", answer, answer[::-1]]
        rows.append(dict(id=f"contract-{i}", prompt=p.prompt, completions=completions, answer=answer,
                         reference=p.reference, difficulty=p.difficulty, round=ctx.round, source="contract"))
    data = make_rows(rows)
    return data if with_references else blind(data)


class AcquirerContract(StrategyContract):
    kind = "acquire"
    needs_model = True

    def acquire(self, strategy, ctx, round_: int = 1):
        from selfloop.data import check_dataset

        ctx.round = round_
        _reseed(ctx)
        return check_dataset(strategy.acquire(ctx), self.culprit(strategy))

    def test_returns_rows_of_the_data_contract(self, strategy, ctx):
        data = self.acquire(strategy, ctx)
        assert len(data) > 0, f"{self.culprit(strategy)} acquired nothing at level {ctx.level}"
        assert all(isinstance(a, str) for a in data["answer"])
        assert set(data["round"]) == {ctx.round}, "rows must carry the round that acquired them"
        assert set(data["difficulty"]) <= set(ctx.task.levels), "rows must carry a difficulty level of the task"

    def test_row_ids_are_unique_across_rounds(self, strategy, ctx):
        first = set(self.acquire(strategy, ctx, 1)["id"])
        second = set(self.acquire(strategy, ctx, 2)["id"])
        assert not first & second, "row ids repeat across rounds (include the round in the id)"

    def test_acquisition_is_seeded(self, strategy, ctx):
        assert self.acquire(strategy, ctx)["id"] == self.acquire(strategy, ctx)["id"]


class FilterContract(StrategyContract):
    kind = "filter"
    #: rows fed to the filter by the default ``rows`` fixture
    n_rows: ClassVar[int] = 24

    @pytest.fixture
    def rows(self, ctx):
        """What the filter sees: acquired-like rows without the ``reference`` column."""
        return sample_rows(ctx, self.n_rows, [max(1, ctx.level - 1), ctx.level], with_references=False)

    def run_filter(self, strategy, ctx, rows):
        from selfloop.data import check_filtered

        assert "reference" not in rows.column_names
        _reseed(ctx)
        return check_filtered(rows, strategy.filter(ctx, rows), self.culprit(strategy), f"score_{strategy.name}")

    def test_adds_its_score_and_only_drops_rows(self, strategy, ctx, rows):
        kept = self.run_filter(strategy, ctx, rows)
        scores = kept[f"score_{strategy.name}"]
        assert all(s is None or _number(s) for s in scores), "scores must be numbers"
        before = {r["id"]: r for r in rows}
        for row in kept:
            original = before[row["id"]]
            for column in ("prompt", "answer", "completions", "difficulty"):
                assert row[column] == original[column], f"the filter changed {column!r} of row {row['id']}"

    def test_filtering_is_seeded(self, strategy, ctx, rows):
        first, second = self.run_filter(strategy, ctx, rows), self.run_filter(strategy, ctx, rows)
        assert first["id"] == second["id"]

    def test_handles_empty_input(self, strategy, ctx, rows):
        kept = self.run_filter(strategy, ctx, rows.select([]))
        assert len(kept) == 0


class OptimizerContract(StrategyContract):
    kind = "optimize"
    needs_model = True
    n_rows: ClassVar[int] = 64

    @pytest.fixture
    def rows(self, ctx):
        """Correctly answered rows of the easy levels, without references."""
        return sample_rows(ctx, self.n_rows, list(range(1, ctx.level + 1)), with_references=False, correct_share=1.0)

    def test_returns_a_trained_candidate_and_leaves_the_incumbent(self, strategy, ctx, rows):
        import torch

        from selfloop.model import ModelHandle

        incumbent = {k: v.clone() for k, v in ctx.model.model.state_dict().items()}
        steps = ctx.budget.train_steps
        _reseed(ctx)
        candidate = strategy.optimize(ctx, rows)
        assert isinstance(candidate, ModelHandle), f"{self.culprit(strategy)} returned {type(candidate).__name__}"
        assert candidate is not ctx.model and candidate.model is not ctx.model.model, "return a new candidate"
        after = ctx.model.model.state_dict()
        assert all(torch.equal(incumbent[k], after[k]) for k in incumbent), "the incumbent was modified in place"
        trained = candidate.model.state_dict()
        assert any(not torch.equal(incumbent[k], trained[k].to(incumbent[k].device)) for k in incumbent), "the candidate was not trained"
        assert ctx.budget.train_steps > steps, "add the optimizer's steps to ctx.budget.train_steps"

    def test_candidate_saves_and_reloads(self, strategy, ctx, rows, tmp_path):
        from selfloop.model import ModelHandle

        _reseed(ctx)
        candidate = strategy.optimize(ctx, rows)
        candidate.save(tmp_path / "candidate")
        again = ModelHandle.load(tmp_path / "candidate", device="cpu")
        prompts = rows["prompt"][:4]
        assert again.generate(prompts, max_new_tokens=4) == candidate.generate(prompts, max_new_tokens=4)


class RefinerContract(StrategyContract):
    kind = "refine"
    needs_model = True

    @pytest.fixture
    def prompts(self, ctx):
        return [p.prompt for p in ctx.task.sample(random.Random(0), ctx.level, 6)]

    def check_generations(self, strategy, prompts, out):
        assert isinstance(out, list) and len(out) == len(prompts), f"{self.culprit(strategy)}: one Generation per prompt"
        for prompt, g in zip(prompts, out):
            assert isinstance(g, Generation), f"{self.culprit(strategy)} returned {type(g).__name__}, not a Generation"
            assert g.prompt == prompt, "generations must come back in prompt order"
            assert isinstance(g.answer, str)
            assert g.agreement is None or 0.0 <= g.agreement <= 1.0

    def test_refines_any_generate_function(self, strategy, ctx, prompts):
        calls = []

        def generate(ps, n=1, temperature=0.0):
            calls.append(len(ps))
            return [Generation(p, [f"{p[::-1]}"] * n, p[::-1]) for p in ps]

        _reseed(ctx)
        self.check_generations(strategy, prompts, strategy.refine(ctx, prompts, generate))
        assert calls, "a refiner must generate through the function it is given (the next refiner or the model)"

    def test_refines_the_model_through_the_chain(self, strategy, ctx, prompts):
        ctx.strategies["refine"] = [strategy]
        _reseed(ctx)
        self.check_generations(strategy, prompts, ctx.generate(prompts, max_new_tokens=ctx.task.max_new_tokens(ctx.level)))

    def test_handles_no_prompts(self, strategy, ctx):
        assert strategy.refine(ctx, [], lambda ps, n=1, temperature=0.0: []) == []


class _NoReferences:
    """A task whose problems come without references and whose ground-truth check fails:
    what a label-free evaluator must cope with."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def sample(self, rng, level, n):
        return [Problem(p.prompt, None, p.difficulty) for p in self._task.sample(rng, level, n)]

    def check(self, answer, reference):
        raise AssertionError("a label-free evaluator called task.check (ground truth)")


class EvaluatorContract(StrategyContract):
    kind = "evaluate"
    needs_model = True
    n_rows: ClassVar[int] = 12

    @pytest.fixture
    def ctx(self, plugins, selfloop_ctx):
        # a couple of levels keep evaluation quick; subclasses may widen them
        levels = f"loop.eval_levels=[{max(1, self.level - 1)},{self.level}]"
        return selfloop_ctx([*self.overrides, levels], plugins, level=self.level, with_model=True)

    @pytest.fixture
    def rows(self, ctx, strategy):
        references = bool(getattr(strategy, "uses_references", False))
        return sample_rows(ctx, self.n_rows, [ctx.level], with_references=references)

    def evaluate(self, strategy, ctx) -> dict:
        _reseed(ctx)
        return strategy.evaluate(ctx, ctx.model)

    def test_evaluate_returns_a_numeric_score(self, strategy, ctx):
        out = self.evaluate(strategy, ctx)
        assert isinstance(out, dict) and _number(out.get("score")), f"{self.culprit(strategy)} evaluate() returned {out!r}"
        assert math.isfinite(out["score"])
        by_level = out.get("by_level")
        if by_level is not None:
            assert {int(k) for k in by_level} <= set(ctx.eval_levels), "by_level keys must be evaluated levels"
            assert all(_number(v) for v in by_level.values())

    def test_evaluation_is_repeatable(self, strategy, ctx):
        # the promotion gate compares rounds: the same model must get the same score
        assert self.evaluate(strategy, ctx) == self.evaluate(strategy, ctx)

    def test_scores_one_number_per_row(self, strategy, ctx, rows):
        _reseed(ctx)
        scores = list(strategy.score(ctx, rows))
        assert len(scores) == len(rows) and all(_number(s) for s in scores)

    def test_label_free_evaluator_never_reads_ground_truth(self, strategy, ctx):
        if getattr(strategy, "uses_references", False):
            pytest.skip("uses_references = True: reported as meta-evaluation only")
        ctx.task = _NoReferences(ctx.task)
        out = self.evaluate(strategy, ctx)
        assert _number(out.get("score"))


# -- observers -----------------------------------------------------------------------------
class _Killed(KeyboardInterrupt):
    """What the suite raises to stop a run where a kill -9 would."""


class ObserverContract:
    """For plugins that implement observer hooks (loggers, monitors). Provide an ``observer``
    fixture (the plugin: a module or an object with ``@hookimpl`` methods) and implement
    ``rounds_seen(run_dir)``: the round numbers your observer recorded from
    ``selfloop_on_round_end``, one entry per delivery, read back from what it wrote.

    The suite runs a quick smoke loop (bootstrap plus ``rounds`` rounds), stops it the way a
    ``kill -9`` would right after round 1's promote stage is on disk, before its round event
    is delivered, resumes it, and checks that every round reached the observer exactly once
    (the loop replays events a kill cut off, with ``replayed=True``); then it resumes the
    finished run once more and checks nothing is delivered twice. About 30 s on 2 CPU cores.
    """

    pytestmark = pytest.mark.selfloop_contract

    #: Hydra overrides for the smoke loop the observer watches
    overrides: ClassVar[list[str]] = []
    rounds: ClassVar[int] = 1

    @pytest.fixture
    def observer(self):
        pytest.fail(f"{type(self).__name__}: define an `observer` fixture that returns the plugin (module or object) to test")

    def rounds_seen(self, run_dir) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__}: implement rounds_seen(run_dir) to read back the rounds your observer recorded")

    def run(self, run_dir, observer, killer=None):
        from selfloop.loop import Loop
        from selfloop.rundir import RunDir
        from selfloop.testing.helpers import QUICK, compose, plugins_with

        extra = {"observer_under_test": observer, **({"killer": killer} if killer else {})}
        plugins = plugins_with(extra=extra)
        cfg = compose(["loop=smoke", f"loop.rounds={self.rounds}", *QUICK, *self.overrides], plugins)
        return Loop(cfg, RunDir(run_dir), plugins, echo=lambda s: None).execute()

    def test_every_round_is_delivered_once_across_a_kill_and_resume(self, observer, tmp_path, selfloop_hydra, selfloop_offline):
        import types

        from selfloop.hookspecs import hookimpl

        killer = types.ModuleType("killer")

        @hookimpl(tryfirst=True)
        def selfloop_on_stage_end(ctx, stage, metrics):
            if stage == "promote" and metrics["round"] == 1:
                raise _Killed("killed after round 1's promote stage was written")

        killer.selfloop_on_stage_end = selfloop_on_stage_end
        run_dir = tmp_path / "run"
        with pytest.raises(_Killed):
            self.run(run_dir, observer, killer)
        assert 1 not in self.rounds_seen(run_dir), "the suite's kill did not stop the run before round 1's event"
        assert self.run(run_dir, observer) == "completed"
        expected = list(range(self.rounds + 1))
        seen = self.rounds_seen(run_dir)
        assert sorted(set(seen)) == expected, f"rounds delivered: {sorted(set(seen))}, expected {expected} (a round lost to the kill?)"
        assert sorted(seen) == expected, f"rounds delivered more than once: {sorted(seen)}"
        self.run(run_dir, observer)  # resuming a finished run delivers nothing again
        assert sorted(self.rounds_seen(run_dir)) == expected, "resuming a finished run delivered rounds again"
