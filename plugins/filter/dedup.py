"""Exact and near-duplicate removal with MinHash LSH, streaming over the data in batches.

A self-labelled round repeats itself: the same problem drawn twice, the same question with
other spacing. Training on repeats over-weights a few items. Each row's text (by default
prompt and answer; lowercased, whitespace collapsed) becomes a set of byte ``shingle``-grams,
summarised by a MinHash signature (Broder 1997) whose bins agree between two rows with
probability equal to the Jaccard similarity of their shingle sets. Rows are visited in a
stable order (the data's, or best-first by a ``prefer`` column) and a row is dropped when it
repeats an earlier row exactly, or when its estimated Jaccard similarity to an earlier *kept*
row reaches ``threshold``. Candidate pairs come from locality-sensitive hashing: signatures
cut into bands, rows sharing a band's values share a bucket (Indyk & Motwani 1998; the banding
of Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets* ch. 3), so no pair of rows is
compared unless LSH proposes it.

Speed: signatures use one-permutation hashing (Li, Owen & Zhang 2012: one hash per shingle,
its top bits pick the bin) with empty bins densified by rotation (Shrivastava & Li 2014),
computed with numpy over whole Arrow batches: no Python loop per shingle or per row except
for rows LSH flags as candidates. ``datasketch`` was measured and not used: its per-row
``MinHash`` objects and ``MinHashLSH`` ran at under 1,000 rows/s here, about 40 times slower
(bench/dedup.py, docs/filters.md). Memory per row is the
16-bit signature (b-bit minwise hashing, Li & König 2010), 32-bit band keys and bucket ids:
about ``num_perm * 2 + bands * 8`` bytes, linear in rows.

Score ``score_dedup``: the row's highest estimated similarity to an earlier kept row among its
LSH candidates (0.0 when it has none; 1.0 for an exact repeat). Kept rows score below the
threshold.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Filter

TEXTS = ("prompt_answer", "prompt", "answer")
MODES = ("near", "exact")


@dataclass
class DedupConfig:
    # drop a row whose estimated Jaccard similarity (of shingle sets) to an earlier kept row is >= this
    threshold: float = 0.8
    # near: exact and near-duplicates; exact: identical (normalised) texts only
    mode: str = "near"
    # what a row's text is: prompt_answer ("<prompt>\n<answer>": the same question with
    # another answer is kept), prompt (one row per question), answer
    text: str = "prompt_answer"
    # shingle length in bytes (UTF-8): 5 suits short problems; longer texts may prefer 8
    shingle: int = 5
    # MinHash bins (a power of two): more bins, finer similarity estimates, more memory
    num_perm: int = 64
    # LSH bands; None: the fewest that propose 90% of pairs 0.05 above the threshold
    bands: Optional[int] = None
    # lowercase and collapse whitespace before shingling
    normalize: bool = True
    # compare rows of the same difficulty only
    within_difficulty: bool = False
    # a numeric column (e.g. score_uncertainty from an earlier filter): among duplicates the
    # highest-scoring row survives (NaN last); None: the first row does
    prefer: Optional[str] = None
    # rows hashed per Arrow batch
    batch_size: int = 20000

    def __post_init__(self):
        checks = (
            ("threshold", isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0, "a number in (0, 1]"),
            ("mode", self.mode in MODES, " | ".join(MODES)),
            ("text", self.text in TEXTS, " | ".join(TEXTS)),
            ("shingle", 1 <= self.shingle <= 8, "an integer in [1, 8] (bytes per shingle)"),
            ("num_perm", self.num_perm in (16, 32, 64, 128, 256), "16, 32, 64, 128 or 256"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
        )
        for option, ok, accepted in checks:
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)
        if self.bands is not None and not (1 <= self.bands <= self.num_perm and self.num_perm % self.bands == 0):
            raise OptionError("bands", self.bands, f"null (chosen for the threshold) or a divisor of num_perm={self.num_perm}")


# -- hashing (numpy, whole batches) -----------------------------------------------------------
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_EMPTY = 0xFFFFFFFF  # marks an empty bin before densification


def mix64(x):
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash of uint64 values (a new array)."""
    import numpy as np

    x = np.array(x, dtype=np.uint64, copy=True)
    shifted = x >> np.uint64(30)
    x ^= shifted
    x *= np.uint64(_M1)
    np.right_shift(x, np.uint64(27), out=shifted)
    x ^= shifted
    x *= np.uint64(_M2)
    np.right_shift(x, np.uint64(31), out=shifted)
    x ^= shifted
    return x


def normalized_bytes(texts, normalize: bool):
    """(UTF-8 bytes, offsets) of an Arrow string array; lowercased and whitespace-collapsed
    (runs of whitespace become one space, leading whitespace dropped) when ``normalize``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = pc.fill_null(texts, "")
    if normalize:
        texts = pc.utf8_lower(texts)
    texts = texts.cast(pa.large_string())
    n = len(texts)
    offsets = np.frombuffer(texts.buffers()[1], np.int64, count=n + 1, offset=texts.offset * 8)
    buffer = texts.buffers()[2]
    data = np.frombuffer(buffer, np.uint8)[offsets[0] : offsets[-1]] if buffer is not None else np.zeros(0, np.uint8)
    offsets = offsets - offsets[0]
    if not normalize or not len(data):
        return data, offsets
    other_space = np.zeros(256, bool)
    other_space[list(b"\t\n\r\x0b\x0c")] = True
    data = np.where(other_space[data], np.uint8(32), data)  # every whitespace byte becomes a space
    is_space = data == 32
    repeated = is_space[1:] & is_space[:-1]
    starts = offsets[:-1][offsets[:-1] < len(data)]
    if not repeated.any() and not is_space[starts].any():
        return data, offsets  # nothing to collapse (the common case): no copy
    drop = np.zeros(len(data), bool)
    drop[1:] = repeated
    drop[starts] = is_space[starts]  # a row's leading whitespace goes too
    kept_before = np.concatenate([[0], np.cumsum(~drop)])
    return data[~drop], kept_before[offsets]


def shingle_hashes(data, offsets, k: int):
    """A 64-bit hash per byte k-gram of every row (a row shorter than k is one gram), the
    number of grams per row, each row's first gram, and a key per row that only identical
    texts share (up to 2^-64 collisions: a position-weighted sum of the grams' hashes)."""
    import numpy as np

    lengths = np.diff(offsets)
    counts = np.maximum(lengths - k + 1, 1)
    first = np.cumsum(counts) - counts
    total = int(counts.sum())
    rel = np.arange(total, dtype=np.int64)
    rel -= np.repeat(first, counts)  # each gram's position in its row
    padded = np.zeros(len(data) + 8, np.uint8)
    padded[: len(data)] = data
    # every byte position read as a little-endian uint64 (unaligned view): gram = its low k bytes
    words = np.ndarray(shape=(len(data) + 1,), dtype="<u8", buffer=padded, strides=(1,))
    grams = words[rel + np.repeat(offsets[:-1], counts)]
    masks = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [2**64 - 1], dtype=np.uint64)
    grams &= masks[k]
    if k < 8:
        grams |= np.uint64(k) << np.uint64(59)  # the gram's length, so "1" and "1\0" differ
    short = np.flatnonzero(lengths < k)
    if len(short):  # a row shorter than k: one gram of its own bytes
        grams[first[short]] = (words[offsets[short]] & masks[lengths[short]]) | (lengths[short].astype(np.uint64) << np.uint64(59))
    hashes = mix64(grams)
    rel *= 2
    rel += 1
    weighted = hashes * rel.view(np.uint64)  # odd weights: order matters, nothing cancels
    exact = mix64(np.add.reduceat(weighted, first) ^ lengths.astype(np.uint64)) if total else np.zeros(0, np.uint64)
    return hashes, counts, first, exact


def signatures(hashes, counts, first, num_perm: int):
    """One-permutation MinHash signatures (uint32, rows x num_perm): bin = top bits of each
    gram's hash, value = the minimum of its low 32 bits; an empty bin borrows the nearest
    non-empty bin to its right (densification by rotation, Shrivastava & Li 2014)."""
    import numpy as np

    n = len(counts)
    shift = np.uint64(64 - int(math.log2(num_perm)))
    slots = (hashes >> shift).view(np.int64)
    slots *= n
    slots += np.repeat(np.arange(n), counts)
    values = (hashes & np.uint64(_EMPTY)).astype(np.uint32)
    np.minimum(values, np.uint32(_EMPTY - 1), out=values)  # never the empty marker
    sig = np.full(num_perm * n, _EMPTY, np.uint32)
    np.minimum.at(sig, slots, values)
    sig = sig.reshape(num_perm, n)  # bin-major: the densification sweeps walk contiguous rows
    empty = sig == _EMPTY
    if empty.any():
        sig = _densify(sig, empty)
    return np.ascontiguousarray(sig.T)


def _densify(sig, empty):
    """Rotation densification: one sweep from the last bin to the first carries each row's
    nearest non-empty bin to the right (circularly) and the steps to it; an empty bin takes
    that value plus ``steps * odd constant``, so values borrowed from different distances
    differ. Two rows then agree on a bin with probability equal to their Jaccard similarity.
    Masks are applied by multiplying with 0/1 (branch-free; 6x faster than masked copies):
    at a non-empty bin the carry becomes its own value and the steps 0, so the bin keeps it."""
    import numpy as np

    bins, n = sig.shape
    is_empty, nonempty = empty.astype(np.uint32), (~empty).astype(np.uint32)
    first = np.argmax(~empty, axis=0)  # the carry entering the last bin wraps around from here
    carry = sig[first, np.arange(n)]
    steps = first.astype(np.uint32)
    step = np.uint32(0x9E3779B1)
    out = np.empty_like(sig)
    scratch = np.empty(n, np.uint32)
    for b in range(bins - 1, -1, -1):
        steps += np.uint32(1)
        steps *= is_empty[b]
        np.subtract(sig[b], carry, out=scratch)  # wraps: carry += (sig - carry) where non-empty
        scratch *= nonempty[b]
        carry += scratch
        np.multiply(steps, step, out=out[b])
        out[b] += carry
    return out


def band_keys(sig, bands: int, salt=None):
    """A 32-bit key per row and band: rows whose band values all agree share it."""
    import numpy as np

    rows = sig.shape[1] // bands
    weights = mix64(np.arange(1, sig.shape[1] + 1, dtype=np.uint64)) | np.uint64(1)
    products = sig.astype(np.uint64) * weights
    keys = products.reshape(len(sig), bands, rows).sum(axis=2, dtype=np.uint64)
    keys = keys + (np.arange(bands, dtype=np.uint64) << np.uint64(40))
    if salt is not None:
        keys = keys ^ salt[:, None]
    return (mix64(keys) >> np.uint64(32)).astype(np.uint32)


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.9, margin: float = 0.05) -> int:
    """The fewest bands (a divisor of num_perm: fewer bands, fewer false candidates) whose LSH
    proposes a pair of similarity ``threshold + margin`` with probability >= ``recall``; the
    chance that some band agrees is ``1 - (1 - J**rows)**bands``. The margin is about one
    standard deviation of the similarity estimate at 64 bins: pairs closer to the threshold
    are a coin flip whether LSH proposes them or not."""
    target = min(1.0, threshold + margin)
    for bands in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        rows = num_perm // bands
        if 1 - (1 - target**rows) ** bands >= recall:
            return bands
    return num_perm


# -- the filter -------------------------------------------------------------------------------
class Dedup(Filter):
    name = "dedup"
    Config = DedupConfig

    def filter(self, ctx, data):
        import numpy as np
        from datasets import Value

        from selfloop.progress import progress

        c = self.config
        started = time.perf_counter()
        n = len(data)
        order = visiting_order(data, c.prefer, self.name)
        bands = c.bands or lsh_bands(c.threshold, c.num_perm)
        near = c.mode == "near"
        exact = np.zeros(n, np.uint64)
        sig16 = np.zeros((n, c.num_perm if near else 0), np.uint16)
        keys = np.zeros((n, bands if near else 0), np.uint32)
        columns = ["prompt", "answer"] + (["difficulty"] if c.within_difficulty else [])

        def hash_batch(start: int, batch) -> int:
            end = start + len(batch)
            raw, offsets = normalized_bytes(row_texts(batch, c.text), c.normalize)
            hashes, counts, first, keys_exact = shingle_hashes(raw, offsets, c.shingle)
            salt = mix64(np.asarray(batch["difficulty"], dtype=np.int64).view(np.uint64) + np.uint64(1)) if c.within_difficulty else None
            exact[start:end] = keys_exact ^ salt if salt is not None else keys_exact
            if near:
                sig = signatures(hashes, counts, first, c.num_perm)
                sig16[start:end] = sig.astype(np.uint16)  # b-bit minwise hashing: the low 16 bits suffice to compare
                keys[start:end] = band_keys(sig, bands, salt)
            return len(batch)

        with progress(total=n, desc=f"dedup round {ctx.round}", unit="row") as bar:
            start = 0
            for batch in data.select_columns(columns).with_format("arrow").iter(c.batch_size):
                start += hash_batch(start, batch)
                bar.update(len(batch))
        keep, scores, counts = resolve(order, exact, sig16, keys, c.threshold)
        kept = np.flatnonzero(keep)
        ctx.record(
            self.name,
            rows_in=n,
            rows_out=int(len(kept)),
            exact_duplicates=counts["exact"],
            near_duplicates=counts["near"],
            lsh_candidates=counts["candidates"],
            backend="numpy minhash-lsh (one-permutation hashing)" if near else "numpy exact hashing",
            num_perm=c.num_perm,
            bands=bands if near else None,
            seconds=round(time.perf_counter() - started, 3),
        )
        data = data.add_column(f"score_{self.name}", scores.astype(np.float64), feature=Value("float64"))
        return data.select(kept)


def resolve(order, exact, sig16, keys, threshold: float, chunk: int = 4096):
    """Visit rows in ``order``: drop exact repeats of an earlier row, then rows whose estimated
    similarity to an earlier kept LSH candidate reaches ``threshold``.

    Each bucket's candidate is the first row kept in it. A row first in all its buckets has
    no candidate and is kept. The others (LSH candidates) are first compared, all at once,
    with the bucket owners already known to be kept; only those that survive that are visited
    one by one, in order. Returns (keep mask, scores, counts).
    """
    import numpy as np
    import pandas as pd

    n = len(order)
    keep = np.zeros(n, bool)
    scores = np.zeros(n, np.float64)
    counts = {"exact": 0, "near": 0, "candidates": 0}
    if not n:
        return keep, scores, counts
    order = np.asarray(order)
    codes, _ = pd.factorize(exact[order])  # numbered in order of first appearance
    running = np.maximum.accumulate(codes)
    first_time = np.concatenate([[True], running[1:] > running[:-1]])
    scores[order[~first_time]] = 1.0
    counts["exact"] = int((~first_time).sum())
    rows = order[first_time]  # distinct texts, in visiting order
    if not keys.shape[1]:
        keep[rows] = True
        return keep, scores, counts
    bands, m = keys.shape[1], len(rows)
    bucket = np.empty((m, bands), np.int64 if bands * m >= 2**31 else np.int32)
    contested = np.zeros(m, bool)
    owners, offset = [], 0
    for b in range(bands):
        codes, uniques = pd.factorize(keys[rows, b])
        running = np.maximum.accumulate(codes)
        first_in_bucket = np.concatenate([[True], running[1:] > running[:-1]])
        bucket[:, b] = codes + offset
        contested |= ~first_in_bucket
        owners.append(np.flatnonzero(first_in_bucket))
        offset += len(uniques)
    owner = np.concatenate(owners)  # per bucket: its first row; kept unless it is a candidate
    owner[contested[owner]] = -1
    keep[rows[~contested]] = True
    candidates = np.flatnonzero(contested)
    counts["candidates"] = int(len(candidates))
    bins = sig16.shape[1]
    best = np.zeros(len(candidates))
    for s in range(0, len(candidates), chunk):  # against owners known to be kept, vectorised
        part = candidates[s : s + chunk]
        known = owner[bucket[part]]
        same = (sig16[rows[np.maximum(known, 0)]] == sig16[rows[part]][:, None, :]).sum(axis=2)
        best[s : s + chunk] = np.where(known >= 0, same, 0).max(axis=1) / bins
    bar = threshold - 1e-9
    scores[rows[candidates]] = best
    settled = best >= bar
    counts["near"] = int(settled.sum())
    # owners known before the loop were compared above; only rows kept in the loop are new
    decided_in_loop = np.zeros(m + 1, bool)
    for i, known_best in zip(candidates[~settled].tolist(), best[~settled].tolist()):
        slots = bucket[i]
        earlier = owner[slots]
        earlier = earlier[decided_in_loop[earlier]]  # -1 indexes the sentinel, always False
        top = max(known_best, float((sig16[rows[earlier]] == sig16[rows[i]]).sum(axis=1).max()) / bins) if len(earlier) else known_best
        scores[rows[i]] = top
        if top >= bar:
            counts["near"] += 1
            continue
        keep[rows[i]] = True
        decided_in_loop[i] = True
        free = slots[owner[slots] < 0]
        owner[free] = i
    return keep, scores, counts


def row_texts(batch, text: str):
    """The text compared for each row of an Arrow batch (never the reference: filters do not
    see it)."""
    import pyarrow.compute as pc

    if text == "prompt":
        return batch["prompt"].combine_chunks()
    if text == "answer":
        return batch["answer"].combine_chunks()
    return pc.binary_join_element_wise(pc.fill_null(batch["prompt"], ""), pc.fill_null(batch["answer"], ""), "\n").combine_chunks()


def visiting_order(data, prefer: str | None, name: str):
    """Row order of the greedy pass: the data's, or by the ``prefer`` column descending
    (stable; NaN and None last)."""
    import numpy as np

    if prefer is None:
        return np.arange(len(data))
    if prefer not in data.column_names:
        raise SelfloopError(
            f"filter.{name}.prefer={prefer!r} is not a column of the data (columns: {', '.join(data.column_names)}); "
            f"list the filter that adds it before {name}"
        )
    values = data.with_format("numpy")[prefer]
    try:
        values = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise SelfloopError(f"filter.{name}.prefer={prefer!r} names a column that is not numeric ({data.features[prefer]})") from None
    values = np.where(np.isnan(values), -np.inf, values)
    return np.argsort(-values, kind="stable")


@hookimpl
def selfloop_register_filters(register):
    register(Dedup)
