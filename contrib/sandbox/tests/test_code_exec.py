"""The code_exec filter and evaluator: contract suites, behaviour on known rows, a real model,
and a smoke loop that runs them."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest

from selfloop.data import blind, load, make_rows
from selfloop.testing import EvaluatorContract, FilterContract
from selfloop_sandbox.code_exec import CodeExecEval, CodeExecEvalConfig, CodeExecFilter, CodeExecFilterConfig
from selfloop_sandbox.task import value

TASK = ["task=make_number", "filter=[code_exec]"]  # roundtrip (a default filter) needs an inverse this task lacks


class TestFilterContract(FilterContract):
    overrides = TASK

    @pytest.fixture
    def strategy(self):
        return CodeExecFilter()


class TestEvaluatorContract(EvaluatorContract):
    overrides = TASK

    @pytest.fixture
    def strategy(self):
        return CodeExecEval(CodeExecEvalConfig(n_per_level=6))


def rows(answers: dict[str, str]):
    """Acquired-like rows for prompt "345=", as filters see them (no reference column)."""
    data = make_rows(dict(id=i, prompt="345=", answer=a, completions=[a], reference="34*10+5", difficulty=3) for i, a in answers.items())
    return blind(data)


ANSWERS = {
    "canonical": "34*10+5",
    "another-form": "5*69",
    "off-by-one": "34*10+6",
    "no-operator": "345",
    "hostile": "__import__('os').system('true')",
    "power": "3**5+102",
}
RIGHT = ["canonical", "another-form"]


def test_filter_keeps_right_answers_in_any_form_and_drops_the_rest(selfloop_ctx):
    ctx = selfloop_ctx(TASK)
    data = rows(ANSWERS)
    assert "reference" not in data.column_names  # label-free: execution needs no reference
    kept = CodeExecFilter().filter(ctx, data)
    assert kept["id"] == RIGHT
    assert kept["score_code_exec"] == [1.0, 1.0]


def test_filter_runs_the_answer_itself_for_tasks_without_a_program(selfloop_ctx):
    ctx = selfloop_ctx(TASK)
    ctx.task = SimpleNamespace(name="code", extract_answer=str.strip)  # answers are programs
    programs = {"prints": "print(sum(range(10)))", "raises": "raise ValueError('no')", "loops": "while True: pass",
                "escapes": "open('/tmp/selfloop-sandbox-escape', 'w')", "exit-0": "import sys; sys.exit(0)"}
    data = make_rows(dict(id=k, prompt="write a program", answer=v) for k, v in programs.items()).remove_columns("reference")
    kept = CodeExecFilter(CodeExecFilterConfig(timeout_s=0.5)).filter(ctx, data)
    assert kept["id"] == ["prints", "exit-0"]
    assert not os.path.exists("/tmp/selfloop-sandbox-escape")


def test_filter_on_empty_data(selfloop_ctx):
    kept = CodeExecFilter().filter(selfloop_ctx(TASK), rows({}))
    assert len(kept) == 0 and "score_code_exec" in kept.column_names


def test_evaluator_scores_each_row(selfloop_ctx):
    ctx = selfloop_ctx(TASK)
    assert CodeExecEval().score(ctx, rows(ANSWERS)) == [float(k in RIGHT) for k in ANSWERS]
    assert CodeExecEval.uses_references is False


@pytest.fixture(scope="module")
def bootstrapped(smoke_run):
    """The smoke loop's bootstrap model: trained on numbers below 1000."""
    from selfloop.model import ModelHandle

    return ModelHandle.load(smoke_run.run_dir / "round-000" / "optimize" / "model", device="cpu")


def test_evaluate_a_real_model_matches_ground_truth_per_level(selfloop_ctx, bootstrapped):
    ctx = selfloop_ctx([*TASK, "loop.eval_levels=[1,2,3,4]"])
    evaluator = CodeExecEval(CodeExecEvalConfig(n_per_level=24))
    out = evaluator.evaluate(ctx, bootstrapped)
    assert set(out["by_level"]) == {"1", "2", "3", "4"}
    # The same prompts (same seeded generator), checked against references instead of executed:
    rng = random.Random(f"{ctx.seed}:eval:code_exec")
    expected = {}
    for level in (1, 2, 3, 4):
        problems = ctx.task.sample(rng, level, 24)
        outs = bootstrapped.generate([p.prompt for p in problems], max_new_tokens=ctx.task.max_new_tokens(level))
        expected[str(level)] = sum(ctx.task.check(o[0], p.reference) for o, p in zip(outs, problems)) / 24
    assert out["by_level"] == expected
    assert out["score"] == pytest.approx(sum(expected.values()) / 4)
    assert out["by_level"]["1"] >= 0.5, "the bootstrap should have taught the easiest level"


def test_a_smoke_loop_runs_with_filter_and_evaluator(smoke_run):
    assert smoke_run.status == "completed"
    filt = smoke_run.stage_metrics(1, "filter")
    steps = {s["filter"]: s for s in filt["filters"]}
    assert list(steps) == ["uncertainty", "code_exec"]
    assert steps["code_exec"]["of"] == steps["uncertainty"]["kept"] and steps["code_exec"]["kept"] == filt["kept"]
    notes = filt["notes"]["code_exec"]  # recorded by the filter into the stage's metrics.json
    assert notes["programs"] == steps["code_exec"]["of"] and notes["passed"] == steps["code_exec"]["kept"]
    # Execution is ground truth for this task: every kept pseudo-label is right.
    assert filt["label_precision"] == (1.0 if filt["kept"] else None)
    kept = load(smoke_run.run_dir / "round-001" / "filter" / "data")
    assert "reference" not in kept.column_names and set(kept["score_code_exec"]) <= {1.0}
    assert all(value(a) == int(p[:-1]) for p, a in zip(kept["prompt"], kept["answer"]))

    for round_ in (0, 1):
        evaluators = smoke_run.stage_metrics(round_, "evaluate")["evaluators"]
        assert evaluators["code_exec"]["uses_references"] is False and evaluators["exact_match"]["uses_references"] is True
        assert set(evaluators["code_exec"]["by_level"]) == {"1", "2", "3", "4"}
    record = smoke_run.records[1]
    assert "code_exec" in record["autonomous"] and "code_exec" in record["gate"]  # it steers promotion
    assert "code_exec" not in record["meta"]
