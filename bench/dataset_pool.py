"""task=dataset on a 1,000,000-row JSONL pool against a 1,000-row one.

    python bench/dataset_pool.py [--rows 1000000] [--small 1000] [--workdir /tmp/selfloop-bench-pool]

Target (issue 8): the pool is read without loading it into Python lists (memory-mapped
Arrow), and acquisition from it costs the same per row at 1k and 1M rows.

What it measures, with word-problem rows (``plugins/tasks/word_problems.py``):

1. memory, one fresh process per size (a warm load: the JSONL was converted to Arrow once,
   as every run after the first finds it): peak RSS, private (anonymous) RSS, the peak of
   Python's own heap (``tracemalloc``: Python objects and NumPy arrays) and Arrow's pool
   during ``DatasetTask`` setup; the one-time JSONL -> Arrow conversion is timed apart;
2. acquisition, both sizes in one process, interleaved so machine noise hits both alike:
   the acquire stage's draw (``task.sample`` inside an acquire stage) of ``--draw`` rows per
   call, (a) from a fresh pool, (b) with two earlier rounds' acquisitions on disk: the
   exclusion the next round derives from the run directory (once per round), and the draw
   that then skips those rows.

It prints JSON with the numbers and the 1M/1k ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# earlier rounds on disk before the measured draws (the 1k pool has 160 rows at level 1)
HISTORY = 2

def write_pool(path: Path, rows: int) -> None:
    import random

    from selfloop_plugins.tasks.word_problems import problem

    if path.exists() and sum(1 for _ in path.open("rb")) == rows:
        return
    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps(problem(rng, 1 + i % 5)) + "\n")


def config(path: Path):
    from selfloop_plugins.tasks.dataset import DatasetConfig

    return DatasetConfig(path=str(path), difficulty_column="difficulty", checker="numeric", labelled_size=100, eval_size=100)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory(path: Path) -> dict:
    """Run in a fresh process: load the task (warm) and report its memory."""
    import resource
    import tracemalloc

    import datasets  # noqa: F401 - imported before measuring, like a run does
    import numpy  # noqa: F401
    import pyarrow as pa

    from selfloop_plugins.tasks.dataset import DatasetTask

    before_rss, before_anon = status_kb("VmRSS"), status_kb("RssAnon")
    tracemalloc.start()
    started = time.perf_counter()
    task = DatasetTask(config(path))
    task.loaded  # noqa: B018 - the load every run's setup does
    seconds = time.perf_counter() - started
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "load_s": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_growth_mb": round((status_kb("VmRSS") - before_rss) / 1024, 1),
        "private_rss_growth_mb": round((status_kb("RssAnon") - before_anon) / 1024, 1),
        "file_backed_rss_mb": round(status_kb("RssFile") / 1024, 1),
        "python_heap_peak_mb": round(python_peak / 2**20, 2),
        "arrow_pool_mb": round(pa.total_allocated_bytes() / 2**20, 2),
        "pool_rows": sum(map(len, task.loaded.pool.by_level.values())),
    }


def acquire_ctx(run_dir: Path, round_: int):
    """The parts of a RunContext an acquire stage's draw uses."""
    import random
    from types import SimpleNamespace

    from selfloop.rundir import RunDir

    ctx = SimpleNamespace(stage="acquire", round=round_, level=1, run_dir=RunDir(run_dir), artifacts={}, rng=random.Random(round_))
    ctx.save_artifact = lambda name, filename, content: ctx.artifacts.__setitem__(f"artifacts/{name}/{filename}", content.encode())
    ctx.request_stop = lambda reason: None
    ctx.warn = lambda name, message: None
    return ctx


def write_history(task, run_dir: Path, rounds: int, draw: int) -> None:
    """Earlier rounds' acquire stages, as the loop writes them (data + the task's artifact)."""
    from selfloop.data import make_rows, save

    for round_ in range(1, rounds + 1):
        ctx = acquire_ctx(run_dir, round_)
        task._ctx = ctx
        problems = task.sample(ctx.rng, 1, draw)
        rows = make_rows(dict(id=f"r{round_}-{i}", prompt=p.prompt, answer="", reference=p.reference, difficulty=1, round=round_) for i, p in enumerate(problems))

        def write(tmp, rows=rows, artifacts=dict(ctx.artifacts)):
            save(rows, tmp / "data")
            for rel, content in artifacts.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(content)

        ctx.run_dir.write_stage(round_, "acquire", {"rows": len(rows)}, write)


def timing(paths: dict[str, Path], workdir: Path, draw: int, repeat: int) -> dict:
    from selfloop_plugins.tasks.dataset import DatasetTask

    tasks = {name: DatasetTask(config(p)) for name, p in paths.items()}
    for t in tasks.values():
        t.loaded  # noqa: B018
    for name, t in tasks.items():
        run_dir = workdir / f"history-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        write_history(t, run_dir, HISTORY, draw)
    fresh, derive, after = ({name: [] for name in tasks} for _ in range(3))
    for i in range(repeat):  # interleaved: contention on a shared machine hits both sizes alike
        for name, t in tasks.items():
            ctx = acquire_ctx(workdir / f"fresh-{name}", 1)  # round 1: nothing acquired before
            ctx.rng.seed(i)
            t._ctx = ctx
            started = time.perf_counter()
            t.sample(ctx.rng, 1, draw)
            fresh[name].append((time.perf_counter() - started) / draw)
            # a later round: the exclusion is derived from the run directory once per round ...
            ctx = acquire_ctx(workdir / f"history-{name}", HISTORY + 1)
            ctx.rng.seed(i)
            t._ctx, t._excluded = ctx, None
            ctx.run_dir._verified.clear()
            started = time.perf_counter()
            t._acquired_before(ctx)
            derive[name].append(time.perf_counter() - started)
            # ... and every draw of the round excludes those rows
            started = time.perf_counter()
            t.sample(ctx.rng, 1, draw)
            after[name].append((time.perf_counter() - started) / draw)
    med = statistics.median
    return {
        name: {
            "draw_us_per_row": round(med(fresh[name]) * 1e6, 2),
            "draw_after_earlier_rounds_us_per_row": round(med(after[name]) * 1e6, 2),
            "exclusion_from_run_dir_ms_per_round": round(med(derive[name]) * 1e3, 2),
        }
        for name in tasks
    }


def main() -> None:
    import datasets

    datasets.disable_progress_bars()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--draw", type=int, default=50, help="rows per acquire draw")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/selfloop-bench-pool"))
    parser.add_argument("--memory-of", type=Path, help=argparse.SUPPRESS)  # the per-size child process
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.memory_of:
        print(json.dumps(memory(args.memory_of)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(args.workdir / "cache")
    shutil.rmtree(args.workdir / "cache", ignore_errors=True)  # so the first load converts, as a first run does
    paths = {"small": args.workdir / f"pool-{args.small}.jsonl", "large": args.workdir / f"pool-{args.rows}.jsonl"}
    write_pool(paths["small"], args.small)
    write_pool(paths["large"], args.rows)
    conversion = {}
    for name, path in paths.items():  # the one-time JSONL -> Arrow conversion (a cold load)
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--memory-of", str(path)], check=True, capture_output=True, env=os.environ)
        conversion[name] = round(time.perf_counter() - started, 1)
    mem = {name: json.loads(subprocess.run([sys.executable, __file__, "--memory-of", str(p)], check=True, capture_output=True, text=True, env=os.environ).stdout)
           for name, p in paths.items()}
    cost = timing(paths, args.workdir, args.draw, args.repeat)
    small, large = f"{args.small}_rows", f"{args.rows}_rows"
    out = {
        "rows": {small: args.small, large: args.rows},
        "first_load_with_conversion_s": {small: conversion["small"], large: conversion["large"]},
        "memory": {small: mem["small"], large: mem["large"]},
        "acquisition": {small: cost["small"], large: cost["large"]},
        "ratios_large_over_small": {
            "rows": args.rows / args.small,
            "draw_cost_per_row": round(cost["large"]["draw_us_per_row"] / cost["small"]["draw_us_per_row"], 2),
            "draw_cost_per_row_after_earlier_rounds": round(cost["large"]["draw_after_earlier_rounds_us_per_row"] / cost["small"]["draw_after_earlier_rounds_us_per_row"], 2),
            "exclusion_per_round": round(cost["large"]["exclusion_from_run_dir_ms_per_round"] / cost["small"]["exclusion_from_run_dir_ms_per_round"], 2),
            "peak_rss": round(mem["large"]["peak_rss_mb"] / mem["small"]["peak_rss_mb"], 2),
            "python_heap_peak": round(mem["large"]["python_heap_peak_mb"] / max(mem["small"]["python_heap_peak_mb"], 1e-3), 1),
        },
        "python_heap_peak_bytes_per_row_large": round(mem["large"]["python_heap_peak_mb"] * 2**20 / args.rows, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
