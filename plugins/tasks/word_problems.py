"""Generate the packaged arithmetic word problems (``builtin:word_problems``), deterministic
from a seed::

    python -m selfloop_plugins.tasks.word_problems [--per-level 1000] [--seed 0] [--out PATH]

One JSON object per line: ``question`` (a short story), ``answer`` (an integer) and
``difficulty`` (1-5). Levels grow the numbers, then the number of steps:

1. one step, one-digit numbers            ("Ann has 3 pens. She gets 4 more. ...")
2. one step, a two-digit and a one-digit number
3. one step, two two-digit numbers
4. one step, a three-digit and a two-digit number
5. two steps, a two-digit and two one-digit numbers

Questions stay under 100 characters so the built-in tiny model (n_positions=128) reads a
whole problem plus its answer. Not imported by selfloop at start-up.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Ann", "Ben", "Cai", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lee", "Max", "Ned", "Ola", "Pam", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe")
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "cups", "hats", "keys", "toys", "stamps", "shells", "rocks", "balls", "cakes", "nuts")
ADD = (
    "{a_name} has {a} {items}. {a_name} gets {b} more. How many {items} does {a_name} have now?",
    "{a_name} had {a} {items} and found {b} more. How many {items} now?",
    "{a_name} has {a} {items} and {b_name} has {b}. How many {items} in all?",
    "A box holds {a} {items}. {a_name} adds {b}. How many {items} are in the box?",
)
SUB = (
    "{a_name} has {a} {items} and gives {b} to {b_name}. How many {items} are left?",
    "{a_name} had {a} {items}. {a_name} lost {b}. How many {items} now?",
    "There are {a} {items}. {a_name} takes {b}. How many {items} are left?",
    "{a_name} has {a} {items} and {b_name} has {b}. How many more does {a_name} have?",
)
TWO_STEPS = (
    "{a_name} has {a} {items}, gets {b} more, then gives {c} away. How many {items} now?",
    "{a_name} had {a} {items}, lost {c}, then found {b}. How many {items} now?",
    "A bag holds {a} {items}. {a_name} adds {b} and {b_name} takes {c}. How many are left?",
)
# operand ranges per level: (first, second)
RANGES = {1: ((1, 9), (1, 9)), 2: ((10, 99), (1, 9)), 3: ((10, 99), (10, 99)), 4: ((100, 999), (10, 99))}


def problem(rng: random.Random, level: int) -> dict:
    names = rng.sample(NAMES, 2)
    words = {"a_name": names[0], "b_name": names[1], "items": rng.choice(ITEMS)}
    if level == 5:
        a, b, c = rng.randint(10, 99), rng.randint(1, 9), rng.randint(1, 9)
        return {"question": rng.choice(TWO_STEPS).format(a=a, b=b, c=c, **words), "answer": a + b - c, "difficulty": level}
    (lo1, hi1), (lo2, hi2) = RANGES[level]
    a, b = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    if rng.random() < 0.5:
        return {"question": rng.choice(ADD).format(a=a, b=b, **words), "answer": a + b, "difficulty": level}
    if a < b:
        a, b = b, a
    return {"question": rng.choice(SUB).format(a=a, b=b, **words), "answer": a - b, "difficulty": level}


def generate(per_level: int = 1000, seed: int = 0, levels: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng, level) for level in range(1, levels + 1) for _ in range(per_level)]


def default_path() -> Path:
    return Path(__file__).resolve().parent / "data" / "word_problems.jsonl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-level", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=default_path())
    args = parser.parse_args(argv)
    rows = generate(args.per_level, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} problems to {args.out}")


if __name__ == "__main__":
    main()
