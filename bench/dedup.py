"""Benchmark the `dedup` filter on synthetic rows: throughput and peak memory.

    python bench/dedup.py [--sizes 100000 1000000] [--datasketch 20000]

Target: >= 50,000 rows/s at 1,000,000 rows on the 2-core reference machine, with peak memory
growing linearly in rows. Each size runs in a fresh subprocess, which reports the filter's
time (wall and CPU), its peak RSS (sampled every 5 ms) above the RSS before the call, and the same-process
baseline: the cheapest possible dedup (exact only: Python's hash of each row in a set), so the
ratio cancels machine load. Rows: 8 words from a 5,000-word vocabulary plus numbers (about
55 characters); 10% exact copies and 10% near copies (one character substituted) of an earlier
distinct row, as in a round where the same problem is drawn again. Removal of near copies is
reported by their true Jaccard similarity (of 5-byte shingle sets) to the row they copy: the
filter's threshold is 0.8 and its estimate has a standard deviation of about 0.05 there.
``--datasketch N`` also times datasketch's MinHash + MinHashLSH on N rows, when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import types


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str], dict[int, int]]:
    """Prompts, answers, each row's kind (distinct, exact, near) and the row each near copy copies."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randrange(3, 9))) for _ in range(5000)]
    prompts, answers, kinds, source, originals = [], [], [], {}, []
    for i in range(n):
        r = rng.random()
        if i > 10 and r < 0.1:
            j = rng.choice(originals)  # copies copy distinct rows: a copy's nearest kept row is its source
            prompts.append(prompts[j]), answers.append(answers[j]), kinds.append("exact")
        elif i > 10 and r < 0.2:
            j = rng.choice(originals)
            chars = list(prompts[j])
            chars[rng.randrange(len(chars))] = rng.choice(letters)
            prompts.append("".join(chars)), answers.append(answers[j]), kinds.append("near")
            source[i] = j
        else:
            words = " ".join(rng.choice(vocab) for _ in range(8))
            prompts.append(f"{words} {rng.randrange(10**6)}?"), answers.append(str(rng.randrange(10**4))), kinds.append("distinct")
            originals.append(i)
    return prompts, answers, kinds, source


def jaccard(a: str, b: str, k: int = 5) -> float:
    a, b = (" ".join(x.lower().split()).encode() for x in (a, b))
    sa, sb = ({x[i : i + k] for i in range(max(1, len(x) - k + 1))} for x in (a, b))
    return len(sa & sb) / len(sa | sb)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_during(fn):
    """(result, wall seconds, peak RSS increase in bytes, CPU seconds of this process) of fn()."""
    before, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    done.set()
    watcher.join()
    return out, seconds, max(peak[0], rss()) - before, cpu


def one_size(n: int) -> dict:
    from datasets import Dataset

    from selfloop_plugins.filter.dedup import Dedup, DedupConfig

    prompts, answers, kinds, source = synthetic(n)
    similarity = {i: jaccard(f"{prompts[i]}\n{answers[i]}", f"{prompts[j]}\n{answers[j]}") for i, j in source.items()}
    data = Dataset.from_dict({"id": [str(i) for i in range(n)], "prompt": prompts, "answer": answers, "difficulty": [0] * n})
    del prompts, answers
    notes = {}
    ctx = types.SimpleNamespace(round=1, record=lambda name, **kw: notes.update(kw), warn=lambda *a: None)
    kept, seconds, peak, cpu = peak_during(lambda: Dedup(DedupConfig()).filter(ctx, data))

    def baseline():
        seen, keep = set(), []
        for batch in data.select_columns(["prompt", "answer"]).with_format("arrow").iter(20000):
            for i, (p, a) in enumerate(zip(batch["prompt"].to_pylist(), batch["answer"].to_pylist())):
                h = hash(p + "\n" + a)
                if h not in seen:
                    seen.add(h)
                    keep.append(i)
        return keep

    _, base_seconds, _, base_cpu = peak_during(baseline)
    kept_ids = set(int(i) for i in kept["id"])
    by_kind = {k: [i for i, x in enumerate(kinds) if x == k] for k in ("distinct", "exact")}
    near = {name: [i for i, j in similarity.items() if lo <= j < hi] for name, (lo, hi) in
            {"near_copies_J>=0.85": (0.85, 2), "near_copies_J_0.75-0.85": (0.75, 0.85), "near_copies_J<0.75": (0, 0.75)}.items()}
    return {
        "rows": n,
        "seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds),
        "cpu_seconds": round(cpu, 2),
        "rows_per_cpu_s": round(n / cpu),  # the sampler thread's few wakeups included
        "peak_rss_increase_mib": round(peak / 2**20, 1),
        "bytes_per_row": round(peak / n),
        "baseline_exact_set_seconds": round(base_seconds, 2),
        "ratio_to_baseline": round(seconds / base_seconds, 2),
        "cpu_ratio_to_baseline": round(cpu / base_cpu, 2),
        "kept": len(kept),
        "distinct_rows_kept_share": round(sum(i in kept_ids for i in by_kind["distinct"]) / len(by_kind["distinct"]), 4),
        "exact_copies_removed_share": round(sum(i not in kept_ids for i in by_kind["exact"]) / max(1, len(by_kind["exact"])), 4),
        **{f"{name}_removed_share": round(sum(i not in kept_ids for i in ids) / max(1, len(ids)), 4) for name, ids in near.items()},
        "near_copies_by_similarity": {name: len(ids) for name, ids in near.items()},
        "notes": notes,
    }


def datasketch_rate(n: int) -> dict:
    from datasketch import MinHash, MinHashLSH

    prompts, answers, _, _ = synthetic(n)
    start = time.perf_counter()
    lsh, kept = MinHashLSH(threshold=0.8, num_perm=128), 0
    for i, (p, a) in enumerate(zip(prompts, answers)):
        text = " ".join(f"{p}\n{a}".lower().split()).encode()
        m = MinHash(num_perm=128)
        m.update_batch([text[j : j + 5] for j in range(max(1, len(text) - 4))])
        if not lsh.query(m):
            lsh.insert(str(i), m)
            kept += 1
    seconds = time.perf_counter() - start
    return {"datasketch_rows": n, "datasketch_seconds": round(seconds, 2), "datasketch_rows_per_s": round(n / seconds), "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--datasketch", type=int, default=0, help="also time datasketch on this many rows")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    results = []
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    for n in args.sizes:  # a fresh process per size: its peak RSS is its own
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    if len(results) > 1:
        small, large = results[0], results[-1]
        results.append({"memory_growth": round(large["peak_rss_increase_mib"] / small["peak_rss_increase_mib"], 2), "rows_growth": large["rows"] / small["rows"]})
    if args.datasketch:
        try:
            results.append(datasketch_rate(args.datasketch))
        except ImportError:
            results.append({"datasketch": "not installed"})
    print(json.dumps(results, indent=2))
    print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
