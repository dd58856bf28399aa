"""Addition with digits written least-significant first: ``"21+93=" -> "15"`` (12+39=51).

Reversed digits let a left-to-right model produce carries in order (Lee et al. 2025);
difficulty = the number of digits of the longer operand.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Problem, Task


@dataclass
class AdditionConfig:
    max_level: int = 10
    # pad both operands and the sum to the level's width (a fixed-length format)
    zero_pad: bool = False

    def __post_init__(self):
        if self.max_level < 2:
            raise OptionError("max_level", self.max_level, "an integer >= 2")


class Addition(Task):
    name = "addition"
    Config = AdditionConfig
    alphabet = "0123456789+="

    @property
    def levels(self) -> list[int]:
        return list(range(1, self.config.max_level + 1))

    @property
    def bootstrap_levels(self) -> list[int]:
        return [1, 2]  # a tiny model learns 1-2 digit sums in minutes; 3+ digits take far longer

    def sample(self, rng: random.Random, level: int, n: int) -> list[Problem]:
        out = []
        lo = 10 ** (level - 1) if level > 1 else 0
        for _ in range(n):
            a = rng.randint(lo, 10**level - 1)
            b = rng.randint(0, 10**level - 1)
            if rng.random() < 0.5:
                a, b = b, a
            out.append(Problem(prompt=f"{self._fmt(a, level)}+{self._fmt(b, level)}=", reference=self._fmt(a + b, level + 1 if self.config.zero_pad else None), difficulty=level))
        return out

    def _fmt(self, x: int, width: int | None) -> str:
        s = str(x)
        if self.config.zero_pad and width:
            s = s.zfill(width)
        return s[::-1]

    def is_well_formed(self, problem_prompt: str, answer: str) -> bool:
        longest = max(len(t) for t in problem_prompt.rstrip("=").split("+"))
        return answer.isdigit() and longest <= len(answer) <= longest + 1

    def max_new_tokens(self, level: int) -> int:
        return level + 3

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        """A nearby problem with its own reference (for ``acquire/augment``): one digit of one
        operand changed (the level stays: a leading digit stays non-zero), or one operand one
        digit longer (the level may grow by one). The sum always changes."""
        try:
            left, right = problem.prompt.rstrip("=").split("+")
            a, b = int(left[::-1]), int(right[::-1])
        except ValueError:
            raise ValueError(f"not an addition prompt ('<digits>+<digits>='): {problem.prompt!r}") from None
        level = max(len(str(a)), len(str(b)))
        which = rng.randrange(2)
        digits = str((a, b)[which])
        if rng.random() < 0.5 and (len(digits) < level or level < self.config.max_level):
            digits = str(rng.randint(1, 9)) + digits  # one more digit, at the most significant end
        else:
            i = rng.randrange(len(digits))
            lowest = 1 if i == 0 and len(digits) > 1 else 0
            digits = digits[:i] + rng.choice([d for d in "0123456789"[lowest:] if d != digits[i]]) + digits[i + 1 :]
        a, b = (int(digits), b) if which == 0 else (a, int(digits))
        level = max(len(str(a)), len(str(b)))
        pad = self.config.zero_pad
        return Problem(prompt=f"{self._fmt(a, level)}+{self._fmt(b, level)}=", reference=self._fmt(a + b, level + 1 if pad else None), difficulty=level)


@hookimpl
def selfloop_register_tasks(register):
    register(Addition)
