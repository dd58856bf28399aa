"""Benchmark the `diversity` filter (TF-IDF embeddings) on synthetic rows: time and memory.

    python bench/diversity.py [--sizes 10000 100000]

Target: 100,000 rows with memory linear in rows (never a rows x rows matrix: at 100,000 rows
that would be 40 GB of float32), time recorded. Each size runs in a fresh subprocess that
reports the filter's time and its peak RSS (sampled every 5 ms) above the RSS before the call,
for two selections: the default (half the rows kept: ``auto`` picks k-means at this size) and
k-center greedy keeping 1,000 rows. The same-process baseline is TF-IDF alone (scikit-learn's
``fit_transform`` on the same texts), the cost no embedding-based selection avoids. Rows:
word-problem-like sentences from 200 templates of very unequal frequency (a long tail), so
coverage is measured too: templates represented in the kept rows, against a random subset of
the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(__file__))
from dedup import peak_during  # noqa: E402  (same folder: the RSS sampler)

NAMES = ["Tom", "Mary", "Ali", "Sam", "Lena", "Omar", "Kim", "Ivan", "Rosa", "Ben"]
THINGS = ["apples", "pencils", "marbles", "stamps", "coins", "books", "cards", "shells", "cookies", "stickers"]
VERBS = ["buys", "finds", "gives away", "sells", "loses", "collects", "trades", "receives", "bakes", "wins"]


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[int], list[int]]:
    """Texts, their template (cluster) and a difficulty level; template frequencies follow a
    power law, so a random subset misses most of the rare ones."""
    rng = random.Random(seed)
    templates = []
    for t in range(200):
        words = [rng.choice(VERBS), rng.choice(THINGS), rng.choice(["morning", "evening", "week", "month", "year"])]
        templates.append("{name} has {a} " + words[1] + " and " + words[0] + " {b} more every " + words[2] + f" (case {t}). How many now?")
    weights = [1 / (t + 1) ** 1.2 for t in range(200)]
    texts, clusters, levels = [], [], []
    for _ in range(n):
        t = rng.choices(range(200), weights)[0]
        texts.append(templates[t].format(name=rng.choice(NAMES), a=rng.randrange(100), b=rng.randrange(100)))
        clusters.append(t)
        levels.append(1 + t % 3)
    return texts, clusters, levels


def one_size(n: int) -> dict:
    from datasets import Dataset
    from sklearn.feature_extraction.text import TfidfVectorizer

    from selfloop_plugins.filter.diversity import Diversity, DiversityConfig

    texts, clusters, levels = synthetic(n)
    data = Dataset.from_dict({"id": [str(i) for i in range(n)], "prompt": texts, "answer": [""] * n, "difficulty": levels})
    notes = {}
    ctx = types.SimpleNamespace(round=1, rng=random.Random(0), task=types.SimpleNamespace(alphabet=None), device="cpu",
                                record=lambda name, **kw: notes.update(kw), warn=lambda *a: None)
    result = {"rows": n}
    _, base, _, _ = peak_during(lambda: TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(texts))
    result["baseline_tfidf_seconds"] = round(base, 2)
    for label, config in (("share_0.5_auto", DiversityConfig()), ("kcenter_1000", DiversityConfig(target_size=1000, method="kcenter"))):
        notes.clear()
        kept, seconds, peak, cpu = peak_during(lambda: Diversity(config).filter(ctx, data))
        covered = len({clusters[int(i)] for i in kept["id"]})
        rng = random.Random(1)
        random_cover = len({clusters[i] for i in rng.sample(range(n), len(kept))})
        result[label] = {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "ratio_to_tfidf": round(seconds / base, 2),
            "peak_rss_increase_mib": round(peak / 2**20, 1),
            "kept": len(kept),
            "templates_covered": covered,
            "random_subset_covers": random_cover,
            "method": notes.get("method"),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    results = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    if len(results) > 1:
        small, large = results[0], results[-1]
        results.append({
            "rows_growth": large["rows"] / small["rows"],
            "memory_growth_share_0.5": round(large["share_0.5_auto"]["peak_rss_increase_mib"] / small["share_0.5_auto"]["peak_rss_increase_mib"], 2),
            "time_growth_share_0.5": round(large["share_0.5_auto"]["seconds"] / small["share_0.5_auto"]["seconds"], 2),
        })
    print(json.dumps(results, indent=2))
    print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
