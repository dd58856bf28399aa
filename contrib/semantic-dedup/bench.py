"""Time the filter's core on 4,000 rows per backend, offline (the numbers in README.md).

    HF_HUB_OFFLINE=1 python contrib/semantic-dedup/bench.py [greedy] [tfidf] [minilm]

Two data sets: the default run's round (2 x 2,000 reversal problems, "1234567=\\n7654321")
and 4,000 English sentences taken from the standard library's docstrings (10% of them
near-copies: lowercased, final period dropped). Prints the load average too: timings on a
shared machine are only comparable at a similar load.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
import sys
import time
import warnings

import numpy as np

from selfloop_semantic_dedup import SemanticDedupConfig, core

MODULES = "os re json collections functools itertools pathlib subprocess threading argparse logging email http urllib unittest typing inspect ast tarfile zipfile socket asyncio decimal statistics random datetime calendar string textwrap difflib csv configparser shutil tempfile pickle copy enum dataclasses contextlib io codecs locale gettext optparse smtplib imaplib ftplib xml.dom.minidom xml.etree.ElementTree sqlite3 gzip bz2 lzma hashlib hmac uuid base64 struct array heapq bisect weakref types operator math queue sched selectors signal multiprocessing concurrent.futures pdb trace tracemalloc timeit doctest pydoc importlib pkgutil runpy sysconfig platform ctypes mailbox mimetypes plistlib shelve tokenize dis pickletools cmd shlex webbrowser wsgiref ipaddress graphlib zoneinfo tomllib"


def sentences(limit: int) -> list[str]:
    """Distinct English sentences from docstrings: realistic, offline, and no download."""
    warnings.filterwarnings("ignore")
    out, seen = [], set()
    for name in MODULES.split():
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, obj in inspect.getmembers(module):
            try:
                docs.append(inspect.getdoc(obj) or "")
            except Exception:
                pass
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and ">>>" not in s and s.lower() not in seen:
                    seen.add(s.lower())
                    out.append(s)
    random.Random(0).shuffle(out)
    return out[:limit]


def main(which: list[str]) -> None:
    rng = random.Random(0)
    reversal = []
    for level in (7, 8):
        for _ in range(2000):
            s = "".join(rng.choice("0123456789") for _ in range(level))
            reversal.append(f"{s}=\n{s[::-1]}")
    prose = sentences(3600)
    prose += [s.lower().rstrip(".") for s in prose[:400]]
    rng.shuffle(prose)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "greedy" in which:  # the similarity pass alone, on random unit vectors (half near-copies)
        for n in (4000, 20000, 50000):
            g = np.random.default_rng(0)
            v = g.standard_normal((n, 384)).astype(np.float32)
            v[n // 2 :] = v[: n - n // 2] + 0.1 * g.standard_normal((n - n // 2, 384)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            t = time.perf_counter()
            keep, _ = core.greedy(v, 0.9, 1024)
            print(f"greedy pass, {n} rows x 384 dims: {time.perf_counter() - t:.2f}s (kept {keep.sum()})")
    defaults = SemanticDedupConfig()
    for backend in ("tfidf", "minilm"):
        if backend not in which:
            continue
        if backend == "minilm":
            t = time.perf_counter()
            core.load_minilm("cpu")
            print(f"minilm: model load {time.perf_counter() - t:.1f}s (once per process)")
        for name, texts in (("reversal", reversal), ("sentences", prose)):
            t, cpu = time.perf_counter(), time.process_time()
            keep, _ = core.dedup(texts, [None] * len(texts), range(len(texts)), backend, defaults.threshold, defaults.batch_size, defaults.block_size, "cpu")
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            print(f"{backend}: {len(texts)} {name} rows in {wall:.2f}s ({cpu:.1f}s CPU; kept {sum(keep)} at threshold {defaults.threshold})")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["greedy", "tfidf", "minilm"])
