"""make_number: answer a number with an arithmetic expression that evaluates to it.

``"345=" -> "34*10+5"``, but ``"300+45"``, ``"5*69"`` and ``"(9+8)*20+5"`` are right too: any
expression over digits, ``+ - *`` and parentheses with at least one binary operator whose
value is the target. String match against one reference would reject most right answers;
executing the answer accepts them all, and needs no reference (the prompt is the spec).

Difficulty: level L draws the target uniformly below 10**L, so about a tenth of a level's
problems are numbers of the levels below, which a model that has mastered those solves: a
foothold for the loop at every new level. The bootstrap's references use one canonical form,
``{T // 10}*10+{T % 10}`` (a copy plus a fixed suffix), which the smoke loop's tiny
character-level model learns in its bootstrap (without, by itself, extending it to longer numbers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.strategy import Problem, Task

# The rules as source: executed here for ``check``/``is_well_formed`` and inside every
# sandboxed program, so both verdicts agree by construction. ``_ast`` is built into the
# interpreter: the rules cost a sandboxed program no import time.
RULES = '''
import _ast


def value(answer, max_chars=64):
    """The answer's value, or None when it breaks the rules."""
    if not 0 < len(answer) <= max_chars or not set(answer) <= set("0123456789+-*()"):
        return None
    try:
        tree = compile(answer, "<answer>", "eval", _ast.PyCF_ONLY_AST)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    binops, stack = 0, [tree.body]
    while stack:
        node = stack.pop()
        if isinstance(node, _ast.BinOp) and isinstance(node.op, (_ast.Add, _ast.Sub, _ast.Mult)):
            binops += 1
            stack += [node.left, node.right]
        elif isinstance(node, _ast.UnaryOp) and isinstance(node.op, (_ast.UAdd, _ast.USub)):
            stack.append(node.operand)
        elif not (isinstance(node, _ast.Constant) and type(node.value) is int):
            return None  # names, calls, powers, floats...: only integer arithmetic
    # Integer +, -, * of at most 64 characters: evaluating the checked tree is safe and fast.
    return eval(compile(tree, "<answer>", "eval"), {"__builtins__": {}}) if binops else None
'''
_rules: dict = {}
exec(RULES, _rules)
value = _rules["value"]


@dataclass
class MakeNumberConfig:
    max_level: int = 12  # level L: targets below 10**L


class MakeNumber(Task):
    name = "make_number"
    Config = MakeNumberConfig
    alphabet = "0123456789+-*()="

    @property
    def levels(self) -> list[int]:
        return list(range(1, self.config.max_level + 1))

    def sample(self, rng: random.Random, level: int, n: int) -> list[Problem]:
        targets = [rng.randint(0, 10**level - 1) for _ in range(n)]
        return [Problem(prompt=f"{t}=", reference=f"{t // 10}*10+{t % 10}", difficulty=level) for t in targets]

    def check(self, answer: str, reference: str) -> bool:
        got = value(self.extract_answer(answer))
        return got is not None and got == value(reference)

    def is_well_formed(self, problem_prompt: str, answer: str) -> bool:
        return value(answer) is not None

    def program(self, problem_prompt: str, answer: str) -> str:
        """Python that exits 0 exactly when ``answer`` is right (the target comes from the prompt)."""
        target, answer = int(problem_prompt.rstrip("=")), self.extract_answer(answer)
        return f"{RULES}\nassert value({answer!r}) == {target}, 'not an allowed expression for {target}'\n"

    def max_new_tokens(self, level: int) -> int:
        return level + 6  # the canonical answer has at most level + 5 characters


@hookimpl
def selfloop_register_tasks(register):
    register(MakeNumber)
