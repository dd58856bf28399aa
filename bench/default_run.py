"""Benchmark the embedded default: wall time and the self-improvement target.

    python bench/default_run.py [--run-dir DIR] [extra hydra overrides...]

Runs `selfloop run` with no other arguments (the embedded default), then checks the target
from the foundation issue: at least two difficulty levels that were never labelled rise from
below 50% to at least 90% ground-truth exact match across rounds, within 10 minutes on a
2-core CPU. Prints a JSON summary; docs/results.md records the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=f"runs/bench-default-{time.strftime('%Y%m%d-%H%M%S')}")
    args, overrides = parser.parse_known_args()
    run_dir = Path(args.run_dir)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "selfloop.cli", "run", f"hydra.run.dir={run_dir}", *overrides], check=True)
    wall = time.monotonic() - started

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    labelled = {lvl for r in records for lvl in r.get("labelled_levels", [])}
    curves: dict[int, list[float]] = {}
    for r in records:
        for by_level in r["meta"].values():
            for level, acc in by_level.items():
                curves.setdefault(int(level), []).append(acc)
            break
    risen = [lvl for lvl, ys in sorted(curves.items()) if lvl not in labelled and ys[0] < 0.5 and max(ys) >= 0.9]
    summary = {
        "wall_seconds": round(wall, 1),
        "rounds": len(records) - 1,
        "labels_used": sum(r["labels_used"] for r in records),
        "labelled_levels": sorted(labelled),
        "first_to_last_accuracy": {lvl: [round(ys[0], 3), round(ys[-1], 3)] for lvl, ys in sorted(curves.items())},
        "label_precision_kept": [r.get("label_precision_kept") for r in records[1:]],
        "promoted": [r["promoted"] for r in records[1:]],
        "unlabelled_levels_risen_to_90": risen,
        "target_met": len(risen) >= 2 and wall <= 600,
        "run_dir": str(run_dir),
    }
    print(json.dumps(summary, indent=2))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
