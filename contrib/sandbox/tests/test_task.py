"""make_number: sampling, the rules, and that the in-process check and the sandboxed program
agree on every answer, right, wrong or hostile."""

from __future__ import annotations

import random

import pytest

from selfloop.testing import TaskContract
from selfloop_sandbox.sandbox import Sandbox, SandboxConfig
from selfloop_sandbox.task import MakeNumber, MakeNumberConfig, value


class TestMakeNumberContract(TaskContract):
    @pytest.fixture
    def strategy(self):
        return MakeNumber()


@pytest.fixture
def task():
    return MakeNumber(MakeNumberConfig(max_level=8))


def test_levels_bound_the_targets(task):
    assert task.levels == list(range(1, 9))
    for level in (1, 3, 6):
        problems = task.sample(random.Random(level), level, 300)
        targets = [int(p.prompt[:-1]) for p in problems]
        assert all(0 <= t < 10**level for t in targets) and all(p.difficulty == level for p in problems)
        assert len(set(targets)) > min(9, 10**level // 2)
        assert all(p.prompt == f"{t}=" and task.check(p.reference, p.reference) for p, t in zip(problems, targets))
        assert all(set(p.prompt + p.reference) <= set(task.alphabet) for p in problems)
        assert all(len(p.reference) <= task.max_new_tokens(level) for p in problems)
    for p in task.sample(random.Random(0), 4, 20):  # the canonical form the bootstrap teaches
        t = int(p.prompt[:-1])
        assert p.reference == f"{t // 10}*10+{t % 10}"


# Right answers for 345: many expressions, not only the reference.
RIGHT = ["34*10+5", "300+45", "5*69", "(9+8)*20+5", "400-55", "345*1", "0+345", "3*100+4*10+5", "-5+350", "(((345)))-0"]
# Wrong, not allowed, or hostile: all must be rejected, and none may run anything.
WRONG = [
    "34*10+6", "345", "(345)", "+345", "-(-345)", "3**5+102", "690/2", "345.0*1", "0x159+0", "1_0*34+5",
    "", " ", "34*10+", "34 * 10 + 5", "(34*10+5", "34*\n10+5", "0345+0",
    "__import__('os').system('true')", "open('x','w')", "345 if 1 else 0", "[345][0]+0", "(lambda: 345)()+0",
    "1)==(1", "0) or (345", "345+0;import os", "9" * 65 + "*0+345",
]


@pytest.mark.parametrize("answer", RIGHT)
def test_accepts_any_right_expression(task, answer):
    assert task.check(answer, "34*10+5") and task.is_well_formed("345=", answer)
    assert value(answer) == 345


@pytest.mark.parametrize("answer", WRONG)
def test_rejects_wrong_and_malicious_answers(task, answer):
    assert not task.check(answer, "34*10+5")


def test_well_formedness_is_about_form_not_value(task):
    assert task.is_well_formed("345=", "1+1")  # well formed, wrong: that is execution's job
    for bad in ("345", "3**5", "__import__('os')", "1+", "1/2+0", "a+b"):
        assert not task.is_well_formed("345=", bad)


def test_the_extracted_answer_is_stripped(task):
    assert task.check("  34*10+5\n", "34*10+5") and Sandbox().run(task.program("345=", " 34*10+5\n")).ok


def test_sandboxed_programs_agree_with_check(task):
    answers = RIGHT + WRONG
    results = Sandbox(SandboxConfig(workers=2)).run_many(task.program("345=", a) for a in answers)
    verdicts = {a: r.ok for a, r in zip(answers, results)}
    assert verdicts == {a: task.check(a, "34*10+5") for a in answers}
    assert all(r.returncode in (0, 1) and not r.killed for r in results), [r.stderr for r in results if r.killed]


def test_a_program_checks_the_prompts_target_not_a_reference(task):
    program = task.program("17=", "9+8")
    assert "9+8" in program and "17" in program
    assert Sandbox().run(program).ok
    assert not Sandbox().run(task.program("18=", "9+8")).ok
