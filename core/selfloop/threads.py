"""How many CPU threads torch uses, so that a run beside other work degrades gracefully.

torch's CPU kernels use one OpenMP thread per core and spin-wait between parallel regions.
Alone that is fastest; beside another CPU-bound process the spinning threads compete for the
same cores: beside one busy torch process a smoke run took 3.2x as long, 1.6x with idle
threads asleep (docs/benchmarks.md, `bench/threads.py`). When the user set nothing, the
``selfloop`` command therefore makes idle OpenMP threads sleep instead of spin
(``OMP_WAIT_POLICY=PASSIVE``, set before torch is imported). A user's ``OMP_WAIT_POLICY``
(and ``OMP_NUM_THREADS``) is always respected; ``SELFLOOP_THREADS=off`` turns the policy off.
"""

from __future__ import annotations

import os

def enabled() -> bool:
    return os.environ.get("SELFLOOP_THREADS", "").lower() not in ("off", "0", "false")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_environment() -> None:
    """Before torch is imported: idle OpenMP threads sleep rather than spin."""
    if enabled():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
