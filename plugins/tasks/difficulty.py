"""Label-free difficulty of ``task=dataset`` pool rows, estimated by the incumbent model
(``task.dataset.difficulty_estimate=loss|agreement``; docs/data.md, "Difficulty without a
difficulty column").

- ``loss``: the mean per-token negative log-likelihood of the model's own greedy answer (one
  generation per row; the log-probabilities come with it, no second forward pass).
- ``agreement``: 1 - the share of ``estimate_samples`` samples at temperature 0.7 whose answer
  is the plurality answer; ties broken by those samples' mean NLL (a term below one vote).

Each scoring batch runs under its own seed (run seed, round, batch number) in a forked torch
random state, outside the stage's random stream: cached scores (a resumed stage) and fresh
ones leave every later draw and generation of the stage the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MODEL_ESTIMATES = ("loss", "agreement")
ESTIMATES = ("none", "length", *MODEL_ESTIMATES)
ARTIFACT = "difficulty.json"  # this acquire stage's scores and thresholds, kept with its outputs
CACHE = "difficulty_scores.json"  # in the stage's checkpoint folder: survives a kill, not the stage
SAMPLING_TEMPERATURE = 0.7
# a score that could not be computed (no finite log-probability): the hardest
UNSCORABLE = 1e6


@dataclass
class Estimates:
    """One acquire stage's difficulty estimates, kept across the task's draws in that stage."""

    estimate: str
    levels: list[int]
    cache: dict[int, float]  # resume cache: (this round's) row -> score
    scores: dict[int, float] = field(default_factory=dict)  # rows scored this stage, in draw order
    thresholds: list[float] | None = None  # fixed by the stage's first scoring
    batches: int = 0
    scored_rows: int = 0  # scored with the model now
    cached_rows: int = 0  # read from the resume cache
    generations: int = 0  # sequences generated for scoring
    drawn_by_level: dict[int, int] = field(default_factory=dict)

    def band(self, row: int) -> int:
        from selfloop_plugins.tasks.tables import bands

        return self.levels[int(bands([self.scores[row]], self.thresholds or [])[0]) - 1]

    def summary(self) -> dict[str, Any]:
        """What the stage records (``notes.dataset.difficulty``): the cost and the bands."""
        by_band: dict[int, int] = {}
        for row in self.scores:
            by_band[self.band(row)] = by_band.get(self.band(row), 0) + 1
        return {
            "estimate": self.estimate,
            "thresholds": self.thresholds,
            "scored_rows": self.scored_rows,
            "cached_rows": self.cached_rows,
            "generations": self.generations,
            "candidates_by_level": {str(k): v for k, v in sorted(by_band.items())},
            "drawn_by_level": {str(k): v for k, v in sorted(self.drawn_by_level.items())},
        }

    def artifact(self) -> str:
        return json.dumps({**self.summary(), "rows": list(self.scores), "scores": list(self.scores.values())})


def load_cache(folder, estimate: str) -> dict[int, float]:
    path = folder / CACHE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except ValueError:  # a kill while writing is impossible (atomic), but be lenient
        return {}
    if saved.get("estimate") != estimate:
        return {}
    return {int(k): float(v) for k, v in saved["scores"].items()}


def save_cache(folder, estimate: str, cache: dict[int, float]) -> None:
    from selfloop.rundir import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / CACHE, {"estimate": estimate, "scores": {str(k): v for k, v in cache.items()}})


def score_batch(model, prompts: list[str], estimate: str, samples: int, max_new_tokens: int, extract, seed: int,
                desc: str) -> tuple[list[float], int]:
    """Difficulty scores of ``prompts`` (higher: harder) and the sequences generated."""
    import torch

    from selfloop.progress import progress

    n, temperature = (1, 0.0) if estimate == "loss" else (samples, SAMPLING_TEMPERATURE)
    devices = [model.device] if model.device.type == "cuda" else []
    with progress(len(prompts), desc, "row") as bar, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        texts, logprobs = model.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                         return_logprobs=True, progress=bar.update)
    if estimate == "loss":
        return [loss_score(lp[0]) for lp in logprobs], len(prompts)
    return [agreement_score(t, lp, extract) for t, lp in zip(texts, logprobs)], len(prompts) * n


def loss_score(mean_logprob: float) -> float:
    return -mean_logprob if math.isfinite(mean_logprob) else UNSCORABLE


def agreement_score(completions: list[str], logprobs: list[float], extract) -> float:
    """1 - plurality share, plus the plurality samples' NLL squeezed below one vote (1/n)."""
    from selfloop_plugins.refine.self_consistency import majority

    # a completion without an answer agrees with nothing
    answers = [a if a is not None else f"\0none{i}" for i, a in enumerate(extract(c) for c in completions)]
    answer, share = majority(answers)
    nll = [-lp for a, lp in zip(answers, logprobs) if a == answer and math.isfinite(lp)]
    tie = (sum(nll) / len(nll)) / (1 + sum(nll) / len(nll)) if nll else 0.999
    return (1 - share) + tie / len(completions)
