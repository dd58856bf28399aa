"""How far the loop goes: the frontier (highest level with ground-truth exact match >= 0.9)
against wall-clock minutes, with no labels after the bootstrap.

    python bench/frontier.py --minutes 30 [--target 18] [--run-dir DIR] [hydra overrides...]
    python bench/frontier.py --plot-only RUN_DIR [RUN_DIR...]     # redraw from finished runs

Runs `selfloop run` (the embedded default unless overrides say otherwise) with
`loop.rounds` large and `loop.max_minutes=MINUTES`, so the run stops at the time budget; then
reads `metrics.jsonl` and reports the frontier after each round against the cumulative stage
time (the records' `compute.seconds`), writes `frontier.png` next to the run(s) and checks the
target. Exit code 0 when the target frontier was reached within the budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def curve(run_dir: Path) -> list[tuple[float, int | None, int]]:
    """(cumulative minutes, frontier, round) after each finished round."""
    out, total = [], 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        total += record.get("compute", {}).get("seconds", 0.0)
        out.append((total / 60, record.get("frontier"), record["round"]))
    return out


def plot(runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = curve(run)
        ax.step([m for m, _, _ in points], [f if f is not None else 0 for _, f, _ in points], where="post", marker="o", ms=3, label=run.name)
    ax.set(title="Frontier: highest length with exact match >= 0.90 (no labels after round 0)", xlabel="minutes (cumulative stage time)",
           ylabel="frontier (string length)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--target", type=int, default=18)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--run-dir", default=f"runs/bench-frontier-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--plot-only", nargs="+", metavar="RUN_DIR")
    args, overrides = parser.parse_known_args()
    if args.plot_only:
        runs = [Path(p) for p in args.plot_only]
        plot(runs, runs[0].parent / "frontier.png")
        print(json.dumps({str(r): curve(r) for r in runs}, indent=2))
        return 0
    run_dir = Path(args.run_dir)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "selfloop.cli", "run", f"hydra.run.dir={run_dir}", f"loop.rounds={args.rounds}",
                    f"loop.max_minutes={args.minutes}", *overrides], check=True)
    wall = time.monotonic() - started
    points = curve(run_dir)
    reached = [(m, f) for m, f, _ in points if f is not None and f >= args.target]
    plot([run_dir], run_dir / "frontier.png")
    summary = {
        "wall_minutes": round(wall / 60, 1),
        "labels_used": sum(json.loads(line)["labels_used"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()),
        "frontier_by_round": [{"round": r, "minutes": round(m, 1), "frontier": f} for m, f, r in points],
        "final_frontier": points[-1][1] if points else None,
        f"minutes_to_frontier_{args.target}": round(reached[0][0], 1) if reached else None,
        "target_met": bool(reached),
        "plot": str(run_dir / "frontier.png"),
    }
    print(json.dumps(summary, indent=2))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
