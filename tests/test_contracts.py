"""The contract suites of selfloop.testing, applied to every built-in strategy, and proof
that a suite fails a strategy that breaks its contract."""

import pytest

from selfloop.testing import (
    AcquirerContract,
    EvaluatorContract,
    FilterContract,
    ModelProviderContract,
    OptimizerContract,
    RefinerContract,
    TaskContract,
)
from selfloop_plugins.acquire.task_sampler import TaskSampler, TaskSamplerConfig
from selfloop_plugins.evaluate.exact_match import ExactMatch, ExactMatchConfig
from selfloop_plugins.evaluate.self_consistency import SelfConsistencyEval
from selfloop_plugins.filter.roundtrip import Roundtrip
from selfloop_plugins.filter.uncertainty import Uncertainty, UncertaintyConfig
from selfloop_plugins.models.tiny import Tiny, TinyConfig
from selfloop_plugins.optimize.sft import SFT, SFTConfig
from selfloop_plugins.refine.self_consistency import SelfConsistency
from selfloop_plugins.tasks.addition import Addition, AdditionConfig
from selfloop_plugins.tasks.reversal import Reversal


class TestReversal(TaskContract):
    @pytest.fixture
    def strategy(self):
        return Reversal()


class TestAddition(TaskContract):
    @pytest.fixture
    def strategy(self):
        return Addition()


class TestAdditionWithIndexHints(TaskContract):
    @pytest.fixture
    def strategy(self):
        return Addition(AdditionConfig(index_hints=True))


class TestTiny(ModelProviderContract):
    @pytest.fixture
    def strategy(self):
        return Tiny(TinyConfig(n_layer=1, n_embd=32, n_head=2))


class TestTinyAbacus(ModelProviderContract):
    @pytest.fixture
    def strategy(self):
        return Tiny(TinyConfig(n_layer=1, n_embd=32, n_head=2, positional="abacus"))


class TestTaskSampler(AcquirerContract):
    @pytest.fixture
    def strategy(self):
        return TaskSampler(TaskSamplerConfig(n_problems=8))


class TestUncertainty(FilterContract):
    @pytest.fixture
    def strategy(self):
        return Uncertainty(UncertaintyConfig(min_agreement=0.75))


class TestRoundTrip(FilterContract):
    needs_model = True

    @pytest.fixture
    def strategy(self):
        return Roundtrip()


class TestSFT(OptimizerContract):
    @pytest.fixture
    def strategy(self):
        return SFT(SFTConfig(max_steps=3, batch_size=8))


class TestSelfConsistencyRefiner(RefinerContract):
    @pytest.fixture
    def strategy(self):
        return SelfConsistency()


class TestSelfConsistencyEvaluator(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return SelfConsistencyEval(SelfConsistencyEval.Config(n_per_level=4))


class TestExactMatch(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return ExactMatch(ExactMatchConfig(n_per_level=4))


BROKEN = '''
import pytest
from dataclasses import dataclass
from selfloop.testing import {suite}

{body}

class TestBroken({suite}):
    @pytest.fixture
    def strategy(self):
        return Broken()
'''


@pytest.mark.parametrize(
    ("suite", "body", "failing"),
    [
        (
            "FilterContract",
            # adds rows of its own and forgets its score column
            "class Broken:\n    name = 'broken'\n    def filter(self, ctx, data):\n"
            "        from datasets import concatenate_datasets\n        return concatenate_datasets([data, data.map(lambda r: {'id': r['id'] + 'x'})])",
            "test_adds_its_score_and_only_drops_rows",
        ),
        (
            "OptimizerContract",
            # trains the incumbent in place and returns it
            "class Broken:\n    name = 'broken'\n    def optimize(self, ctx, data):\n"
            "        import torch\n        with torch.no_grad():\n            next(ctx.model.model.parameters()).add_(1.0)\n        return ctx.model",
            "test_returns_a_trained_candidate_and_leaves_the_incumbent",
        ),
        (
            "EvaluatorContract",
            # claims to be label-free but grades against ground truth
            "class Broken:\n    name = 'broken'\n    def score(self, ctx, data):\n        return [0.0] * len(data)\n"
            "    def evaluate(self, ctx, model):\n        import random\n        ps = ctx.task.sample(random.Random(0), ctx.level, 4)\n"
            "        outs = model.generate([p.prompt for p in ps], max_new_tokens=4)\n"
            "        return {'score': sum(ctx.task.check(o[0], p.reference) for o, p in zip(outs, ps)) / 4}",
            "test_label_free_evaluator_never_reads_ground_truth",
        ),
        (
            "RefinerContract",
            # drops prompts and never calls the generate function it was given
            "class Broken:\n    name = 'broken'\n    def refine(self, ctx, prompts, generate):\n        return []",
            "test_refines_any_generate_function",
        ),
    ],
)
def test_a_suite_fails_a_strategy_that_breaks_its_contract(pytester, suite, body, failing):
    pytester.makepyfile(test_broken=BROKEN.format(suite=suite, body=body))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-k", failing)
    result.assert_outcomes(failed=1)
