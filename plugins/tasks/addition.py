"""Addition with digits written least-significant first: ``"21+93=" -> "15"`` (12+39=51).

Reversed digits let a left-to-right model produce carries in order (Lee et al. 2025);
difficulty = the number of digits of the longer operand. With ``index_hints`` every digit is
preceded by a letter naming its place (Zhou et al. 2024): ``"k2l1+k9l3=" -> "k5l1"``, so
that a digit's partners are found by content, not by counting positions.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Problem, Task


@dataclass
class AdditionConfig:
    max_level: int = 10
    # pad both operands and the sum to the level's width (a fixed-length format)
    zero_pad: bool = False
    # a letter before each digit naming its place, counted from a random letter per problem
    # (so every letter is seen at every length); the sum's places must stay distinct
    index_hints: bool = False
    # generation budget: places beyond the longest possible sum (level + 1 digits). 0 cuts a
    # model that does not stop at the longest sum, so it is judged on the digits it wrote
    answer_slack: int = 2
    # also reject a sum smaller than its larger operand: a necessary condition of any sum,
    # checked without computing the sum; it rejects a dropped carry out of the top place
    # (a + b - 10**level < max(a, b)), the error a vote of models with the same habit passes
    check_magnitude: bool = False

    def __post_init__(self):
        if self.max_level < 2:
            raise OptionError("max_level", self.max_level, "an integer >= 2")
        if self.answer_slack < 0:
            raise OptionError("answer_slack", self.answer_slack, "an integer >= 0")
        if self.index_hints and self.max_level > len(HINTS) - 1:
            raise OptionError("max_level", self.max_level, f"at most {len(HINTS) - 1} with index_hints (one letter per place of the sum)")


HINTS = string.ascii_lowercase


class Addition(Task):
    name = "addition"
    Config = AdditionConfig

    @property
    def alphabet(self) -> str:  # type: ignore[override]
        return "0123456789+=" + (HINTS if self.config.index_hints else "")

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
            first = rng.randrange(len(HINTS)) if self.config.index_hints else 0  # drawn only then: seeds keep their problems
            out.append(self._problem(a, b, first))
        return out

    def _problem(self, a: int, b: int, first: int) -> Problem:
        level = max(len(str(a)), len(str(b)))
        pad = self.config.zero_pad
        return Problem(prompt=f"{self._fmt(a, level, first)}+{self._fmt(b, level, first)}=",
                       reference=self._fmt(a + b, level + 1 if pad else None, first), difficulty=level)

    def _fmt(self, x: int, width: int | None, first: int) -> str:
        s = str(x)
        if self.config.zero_pad and width:
            s = s.zfill(width)
        digits = s[::-1]
        if not self.config.index_hints:
            return digits
        return "".join(HINTS[(first + i) % len(HINTS)] + d for i, d in enumerate(digits))

    def _parse(self, number: str) -> tuple[str, int]:
        """(digits least-significant first, index of the first hint letter); ValueError when
        ``number`` is not written in this task's format."""
        if not self.config.index_hints:
            if not number.isdigit():
                raise ValueError(number)
            return number, 0
        letters, digits = number[0::2], number[1::2]
        if not number or len(letters) != len(digits) or not digits.isdigit() or not set(letters) <= set(HINTS):
            raise ValueError(number)
        first = HINTS.index(letters[0])
        if letters != "".join(HINTS[(first + i) % len(HINTS)] for i in range(len(letters))):
            raise ValueError(number)  # places out of order
        return digits, first

    def is_well_formed(self, problem_prompt: str, answer: str) -> bool:
        try:
            operands = [self._parse(t) for t in problem_prompt.rstrip("=").split("+")]
            digits, first = self._parse(answer)
        except ValueError:
            return False
        longest = max(len(d) for d, _ in operands)
        if first != operands[0][1] or not longest <= len(digits) <= longest + 1:
            return False
        if self.config.check_magnitude and int(digits[::-1]) < max(int(d[::-1]) for d, _ in operands):
            return False
        if len(digits) == longest + 1:  # a carry out of the top place is 1 (0 only when zero-padded)
            return digits[-1] == "1" or (self.config.zero_pad and digits[-1] == "0")
        # the most significant digit is not 0, unless the sum is 0 or the format pads
        return digits[-1] != "0" or len(digits) == 1 or self.config.zero_pad

    def max_new_tokens(self, level: int) -> int:
        places = level + 1 + self.config.answer_slack  # a sum of level-digit numbers has at most level + 1
        return places * (2 if self.config.index_hints else 1)

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        """A nearby problem with its own reference (for ``acquire/augment``): one digit of one
        operand changed (the level stays: a leading digit stays non-zero), or one operand one
        digit longer (the level may grow by one). The sum always changes."""
        try:
            (left, first), (right, _) = (self._parse(t) for t in problem.prompt.rstrip("=").split("+"))
            a, b = int(left[::-1]), int(right[::-1])
        except ValueError:
            shape = "'a<digit>b<digit>...+a<digit>...='" if self.config.index_hints else "'<digits>+<digits>='"
            raise ValueError(f"not an addition prompt ({shape}): {problem.prompt!r}") from None
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
        return self._problem(a, b, first)


@hookimpl
def selfloop_register_tasks(register):
    register(Addition)
