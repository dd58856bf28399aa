"""Benchmark `selfloop plugins` start-up against a bare interpreter start, in one process.

    python bench/startup.py [--repeat 10]

Target: `selfloop plugins` under 1 second. The ratio to `python -c pass` (measured in the
same process, interleaved) makes the number comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    bare, plugins, heavy = [], [], []
    for _ in range(args.repeat):  # interleaved so machine noise hits all alike
        bare.append(timed([sys.executable, "-c", "pass"]))
        plugins.append(timed([sys.executable, "-m", "selfloop.cli", "plugins"]))
        heavy.append(timed([sys.executable, "-c", "import torch, transformers, datasets"]))
    med = statistics.median
    print(
        json.dumps(
            {
                "python_-c_pass_s": round(med(bare), 3),
                "selfloop_plugins_s": round(med(plugins), 3),
                "import_torch_transformers_datasets_s": round(med(heavy), 3),
                "plugins_over_bare_ratio": round(med(plugins) / med(bare), 2),
                "target_under_1s": med(plugins) < 1.0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
