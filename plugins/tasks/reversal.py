"""String reversal: ``"31415=" -> "51413"``; difficulty = string length.

Learnable from scratch in about two minutes on a laptop CPU, and a transformer without
positional encoding already generalizes about one length beyond its training data: the
foothold easy-to-hard self-improvement needs (Lee et al. 2025).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Problem, Task


@dataclass
class ReversalConfig:
    max_level: int = 48  # longest string length offered
    alphabet: str = "0123456789"

    def __post_init__(self):
        if self.max_level < 2:
            raise OptionError("max_level", self.max_level, "an integer >= 2")
        if not self.alphabet or "=" in self.alphabet or len(set(self.alphabet)) != len(self.alphabet):
            raise OptionError("alphabet", self.alphabet, "distinct characters, not '='")


class Reversal(Task):
    name = "reversal"
    Config = ReversalConfig

    @property
    def alphabet(self) -> str:  # type: ignore[override]
        return self.config.alphabet + "="

    @property
    def levels(self) -> list[int]:
        return list(range(1, self.config.max_level + 1))

    @property
    def bootstrap_levels(self) -> list[int]:
        return [v for v in self.levels if v <= 6]  # learnt from scratch in about 2 CPU-minutes

    def sample(self, rng: random.Random, level: int, n: int) -> list[Problem]:
        chars = self.config.alphabet
        out = []
        for _ in range(n):
            s = "".join(rng.choice(chars) for _ in range(level))
            out.append(Problem(prompt=f"{s}=", reference=s[::-1], difficulty=level))
        return out

    def is_well_formed(self, problem_prompt: str, answer: str) -> bool:
        source = problem_prompt.rstrip("=")
        return len(answer) == len(source) and all(c in self.config.alphabet for c in answer)

    def inverse(self, problem_prompt: str, answer: str) -> tuple[str, str]:
        """Reversal is its own inverse: reversing the answer must give back the input."""
        return f"{answer}=", problem_prompt.rstrip("=")

    def max_new_tokens(self, level: int) -> int:
        return level + 2

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        """A nearby problem with its own reference (for ``acquire/augment``): one character
        substituted, two adjacent different characters swapped, one inserted (level + 1) or one
        deleted (level - 1). The prompt, and so the reference, always changes."""
        s, chars = problem.prompt.rstrip("="), self.config.alphabet
        if not s or any(c not in chars for c in s):
            raise ValueError(f"not a reversal prompt of alphabet {chars!r}: {problem.prompt!r}")
        swaps = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
        edits = [e for e, ok in (("substitute", len(chars) > 1), ("swap", bool(swaps)), ("insert", len(s) < self.config.max_level),
                                 ("delete", len(s) > 1)) if ok]
        edit, i = rng.choice(edits), rng.randrange(len(s))
        if edit == "substitute":
            s = s[:i] + rng.choice([c for c in chars if c != s[i]]) + s[i + 1 :]
        elif edit == "swap":
            i = rng.choice(swaps)
            s = s[:i] + s[i + 1] + s[i] + s[i + 2 :]
        elif edit == "insert":
            i = rng.randrange(len(s) + 1)
            s = s[:i] + rng.choice(chars) + s[i:]
        else:
            s = s[:i] + s[i + 1 :]
        return Problem(prompt=f"{s}=", reference=s[::-1], difficulty=len(s))


@hookimpl
def selfloop_register_tasks(register):
    register(Reversal)
