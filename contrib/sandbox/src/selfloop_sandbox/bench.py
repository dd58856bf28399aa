"""Measure the sandbox's per-program cost: ``python -m selfloop_sandbox.bench [--n 60]``.

Compares a bare ``python -I -S -c pass`` with sandboxed runs (each layer switched off in
turn), then throughput of ``run_many`` with 1 and 2 workers on make_number's programs.
Single runs are interleaved, so drift in machine load hits every variant alike.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import time

from selfloop_sandbox.sandbox import Sandbox, SandboxConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="runs per variant")
    args = parser.parse_args(argv)

    variants = {
        "bare python -I -S -c pass (no sandbox)": lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True),
        "sandbox, defaults": Sandbox().run,
        "sandbox, network=off": Sandbox(SandboxConfig(network="off")).run,
        "sandbox, network=off, audit=False, drop_root=False": Sandbox(SandboxConfig(network="off", audit=False, drop_root=False)).run,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.n):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn("pass") if name.startswith("sandbox") else fn()
            times[name].append(time.perf_counter() - started)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.1f}, Python {sys.version.split()[0]}, uid {os.geteuid()}")
    print(f"network namespace available: {Sandbox().run('pass').network_isolated}")
    print(f"\none program at a time (median of {args.n}):")
    bare = statistics.median(times[next(iter(times))])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<55} {1000 * med:6.1f} ms   (+{1000 * (med - bare):5.1f} ms)")

    from selfloop_sandbox.task import MakeNumber

    task = MakeNumber()
    programs = [task.program(p.prompt, p.reference) for p in task.sample(random.Random(0), 4, 4 * args.n)]
    print(f"\nrun_many over {len(programs)} make_number programs (CPU: this process and its children):")
    for workers in (1, 2):
        cpu = _cpu()
        started = time.perf_counter()
        results = Sandbox(SandboxConfig(workers=workers)).run_many(programs)
        elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
        assert all(r.ok for r in results)
        print(
            f"  workers={workers}: {1000 * elapsed / len(programs):5.1f} ms wall per program, {len(programs) / elapsed:4.0f} programs/s;"
            f" {1000 * cpu / len(programs):5.1f} ms CPU per program"
        )


def _cpu() -> float:
    """CPU seconds used by this process and its reaped children (robust to other load)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

if __name__ == "__main__":
    main()
