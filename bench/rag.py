"""Benchmark `refine=[rag]` retrieval over a 100,000-passage corpus.

    python bench/rag.py [--passages 100000] [--queries 5000] [--retrievers bm25,tfidf]

Target: >= 1,000 queries/s (BM25 or TF-IDF). The corpus is synthetic and seeded: passages of
30-80 words drawn from a Zipf(1.1) distribution over a 30,000-word vocabulary (frequent words
occur in most passages, as in real text), written to a .txt file and loaded the way a run
loads it. Each query is 6 words of one passage, so retrieval quality is measurable too
(recall@1 / @k of the source passage). Per retriever it reports the index build time, the
index's size, the peak Python-heap growth while building (tracemalloc: numpy and scipy
arrays included), queries/s of the retrieval alone (`index.search`) and through the refiner
(`Rag.refine` with a generate function that returns at once: prompt templating and the
per-row record included), and, as machine-independent numbers, search time over the time the
vectorizer alone takes to tokenize the same queries, and (BM25) the speed-up over the plain
approach, one sparse product over every posting list then a top-k per query, on 1,000 of the
queries (all measured in the same process).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_corpus(n: int, vocab: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = list(dict.fromkeys("".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(vocab * 2)))[:vocab]
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks ** -1.1
    p /= p.sum()
    lengths = rng.integers(30, 81, size=n)
    drawn = rng.choice(vocab, size=int(lengths.sum()), p=p)
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(words[i] for i in drawn[at : at + length]))
        at += length
    return out


class Ctx:
    """What Rag uses of a RunContext, without a run."""

    def __init__(self):
        from types import SimpleNamespace

        self.notes, self.round, self.device = {}, 1, "cpu"
        self.run_dir = SimpleNamespace(root=Path("(bench)"))
        self.task = SimpleNamespace(alphabet=None, name="bench")
        self.strategies = {"model": []}

    def record(self, strategy, **values):
        self.notes.setdefault(strategy, {}).update(values)

    def warn(self, strategy, message):
        print(f"warning: {strategy}: {message}", file=sys.stderr)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int | None:
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs); the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except (OSError, KeyError):
        return None


def _peak_rss() -> int:
    return _status_kb("VmHWM")


def naive_search_seconds(index, passages: list[str], queries: list[str], k: int) -> float:
    """The same BM25 top-k without the frequent-term split: one sparse product over every
    posting list, then a top-k per query (the baseline the index is measured against)."""
    from selfloop_plugins.refine.rag import _bm25_weights, _top_k

    postings = _bm25_weights(index.vectorizer.transform(passages).tocsr(), 1.5, 0.75).T.tocsr()
    started = time.perf_counter()
    for start in range(0, len(queries), 256):
        q = index.vectorizer.transform(queries[start : start + 256])
        q.data[:] = 1.0
        scores = (q @ postings).tocsr()
        for r in range(scores.shape[0]):
            lo, hi = scores.indptr[r], scores.indptr[r + 1]
            _top_k(scores.data[lo:hi], scores.indices[lo:hi], k)
    return time.perf_counter() - started


def measure(retriever: str, corpus_path: Path, queries: list[str], sources: list[int], k: int) -> dict:
    from selfloop.strategy import Generation
    from selfloop_plugins.refine.rag import Rag, RagConfig

    rag = Rag(RagConfig(corpus=[str(corpus_path)], memory="none", retriever=retriever, k=k, batch_size=256))
    ctx = Ctx()
    rag.corpus_passages()  # file reading is not index building
    rss_before = _reset_peak_rss()
    started = time.perf_counter()
    built = rag.index(ctx)
    build_s = time.perf_counter() - started
    peak_growth = _peak_rss() - rss_before if rss_before is not None else None
    index = built.index

    started = time.perf_counter()
    vectorized = index.vectorizer.transform(queries)
    tokenize_s = time.perf_counter() - started
    del vectorized

    started = time.perf_counter()
    hits = []
    for start in range(0, len(queries), 256):
        hits.extend(index.search(queries[start : start + 256], k, 0.0))
    search_s = time.perf_counter() - started

    def generate(ps, n=1, temperature=0.0):
        return [Generation(p, [""], "") for p in ps]

    started = time.perf_counter()
    rag.refine(ctx, queries, generate)
    refine_s = time.perf_counter() - started

    naive_s = naive_search_seconds(index, built.passages, queries[:1000], k) if retriever == "bm25" else None
    top1 = sum(bool(h) and h[0][0] == s for h, s in zip(hits, sources)) / len(queries)
    topk = sum(any(i == s for i, _ in h) for h, s in zip(hits, sources)) / len(queries)
    return {
        "retriever": retriever,
        "index_build_s": round(build_s, 2),
        "index_mb": round(index.nbytes / 2**20, 1),
        "build_peak_rss_growth_mb": round(peak_growth / 2**20, 1) if peak_growth is not None else None,
        "search_queries_per_s": round(len(queries) / search_s),
        "refine_queries_per_s": round(len(queries) / refine_s),
        "search_over_tokenize_ratio": round(search_s / tokenize_s, 2),
        **({"plain_sparse_product_queries_per_s": round(1000 / naive_s), "speedup_over_plain_product": round(naive_s / 1000 / (search_s / len(queries)), 2)}
           if naive_s else {}),
        "recall_at_1": round(top1, 3),
        f"recall_at_{k}": round(topk, 3),
        "target_1000_qps_met": len(queries) / search_s >= 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--vocab", type=int, default=30_000)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--retrievers", default="bm25,tfidf")
    args = parser.parse_args()

    started = time.perf_counter()
    corpus = synthetic_corpus(args.passages, args.vocab)
    rng = random.Random(1)
    sources = [rng.randrange(len(corpus)) for _ in range(args.queries)]
    queries = [" ".join(rng.sample(corpus[s].split(), 6)) for s in sources]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.txt"
        path.write_text("\n".join(corpus) + "\n")
        print(f"corpus: {len(corpus)} passages, {path.stat().st_size / 2**20:.1f} MB, made in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        import sklearn.feature_extraction.text  # noqa: F401  (imported before timing: not part of an index build)

        from selfloop_plugins.refine.rag import load_passages

        started = time.perf_counter()
        load_passages(str(path))
        load_s = time.perf_counter() - started
        results = [measure(r, path, queries, sources, args.k) for r in args.retrievers.split(",")]
    print(json.dumps({"passages": len(corpus), "queries": len(queries), "corpus_load_s": round(load_s, 2), "results": results}, indent=2))


if __name__ == "__main__":
    main()
