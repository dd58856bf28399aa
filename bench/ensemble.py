"""Seeds that label for each other: N runs of one preset, each voting with its peers' incumbents.

    python bench/ensemble.py --out runs/addition-ensemble --seeds 0 1 2 [--rounds R]
        [--bootstraps DIR] [--threads T] [-- OVERRIDE...]

Lee et al. 2025 lift the accuracy of self-generated labels by a majority vote across
independently seeded models advanced in step. This script launches one ``selfloop run
loop=PRESET seed=S`` per seed (OUT/seed-S), all at once, each with
``refine.ensemble.members=[incumbent,peer:OUT/seed-A,...]`` naming the other seeds' runs: round N
of each run waits for its peers to finish round N-1 (the refiner's ``peer:`` members), so every
round's vote is among models that have trained on the same number of voted rounds.

``--bootstraps DIR`` reuses finished bootstraps instead of training them (DIR/seed-S, any run
directory of the same task and model whose round 0 completed, e.g. an ablation's
OUT/bootstrap or an earlier run of the `addition` preset): round 0 is copied and the runs
resume from round 1. Rerunning the script resumes unfinished runs. At the end ``selfloop
compare`` writes OUT/comparison/ and the script prints the frontier per round and seed.

    python bench/ensemble.py --plot OUT.png LABEL=RUN_DIR,RUN_DIR... [LABEL=...]

draws frontier and kept-label precision per round for groups of runs (one colour per group,
one line per run), e.g. the same seeds with and without the ensemble.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import prepare_job, selfloop, status  # noqa: E402


def records(run: Path) -> list[dict]:
    """The run's round records (none before its first round ends); a corrupt line names its file and line."""
    from selfloop.rundir import read_metrics_jsonl

    path = run / "metrics.jsonl"
    return read_metrics_jsonl(path) if path.exists() else []


def plot_groups(groups: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for colour, (label, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], groups.items()):
        for i, run in enumerate(runs):
            rounds = records(run)
            shown = label if i == 0 else None
            top.plot([r["round"] for r in rounds], [r.get("frontier") or 0 for r in rounds], color=colour, marker="o", ms=3, alpha=0.8, label=shown)
            later = [r for r in rounds if r["round"] > 0 and r.get("label_precision_kept") is not None]
            bottom.plot([r["round"] for r in later], [r["label_precision_kept"] for r in later], color=colour, marker="o", ms=3, alpha=0.8, label=shown)
    top.set(ylabel="frontier (digits, exact match >= 0.9)", title="Frontier and kept-label precision per round (one line per seed)")
    bottom.set(xlabel="round (0: the labelled bootstrap)", ylabel="precision of kept labels")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--plot"]:
        if len(argv) < 3 or any("=" not in g for g in argv[2:]):
            raise SystemExit("usage: bench/ensemble.py --plot OUT.png LABEL=RUN_DIR[,RUN_DIR...] ...")
        groups = {g.split("=", 1)[0]: [Path(d) for d in g.split("=", 1)[1].split(",")] for g in argv[2:]}
        plot_groups(groups, Path(argv[1]))
        print(f"wrote {argv[1]}")
        return
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="addition_ensemble", help="loop preset (loop=...) that selects refine=[ensemble]")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, help="loop.rounds (default: the preset's)")
    parser.add_argument("--bootstraps", type=Path, help="DIR/seed-S: finished bootstraps to start from")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (runs x threads <= cores)")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: at least two seeds (a run votes with its peers)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def overrides(seed: int) -> list[str]:
        peers = ",".join(f"peer:{out / f'seed-{s}'}" for s in args.seeds if s != seed)
        rounds = [f"loop.rounds={args.rounds}"] if args.rounds is not None else []
        return [f"loop={args.preset}", f"seed={seed}", f"refine.ensemble.members=[incumbent,{peers}]",
                f"refine.ensemble.min_members={len(args.seeds)}", *rounds, *extra]

    def launch(seed: int) -> tuple[int, int, str]:
        run_dir, log = out / f"seed-{seed}", out / f"seed-{seed}.log"
        if status(run_dir) == "completed":
            return seed, 0, "completed"
        if not run_dir.exists() and args.bootstraps:
            boot = args.bootstraps / f"seed-{seed}"
            if not (boot / "round-000" / "promote" / "COMPLETE").exists():
                raise SystemExit(f"--bootstraps: {boot} holds no finished round 0")
            prepare_job(run_dir, boot, overrides(seed))
        if run_dir.exists():
            code = selfloop("resume", str(run_dir), threads=args.threads, log=log)
        else:
            code = selfloop("run", *overrides(seed), f"hydra.run.dir={run_dir}", threads=args.threads, log=log)
        return seed, code, status(run_dir) or "?"

    start = time.time()
    print(f"{len(args.seeds)} runs in step, {args.threads} thread(s) each: {out}", flush=True)
    with ThreadPoolExecutor(len(args.seeds)) as pool:  # all at once: each waits for the others every round
        for future in [pool.submit(launch, s) for s in args.seeds]:
            seed, code, final = future.result()
            print(f"  seed {seed}: {final}" + (f" (exit {code}; see {out / f'seed-{seed}.log'})" if code else "")
                  + f"  [{(time.time() - start) / 60:.1f} min]", flush=True)
    runs = [out / f"seed-{s}" for s in args.seeds]
    subprocess.run([sys.executable, "-m", "selfloop.cli", "compare", *map(str, runs), "--out", str(out / "comparison")], check=False)
    print(frontier_table(runs))


def frontier_table(runs: list[Path]) -> str:
    """Frontier and kept-label precision per round (rows) and seed (columns)."""
    per_run = {run.name: {r["round"]: r for r in records(run)} for run in runs}
    rounds = sorted({r for recs in per_run.values() for r in recs})
    head = "| round | " + " | ".join(f"{name} frontier (precision)" for name in per_run) + " |"
    lines = [head, "|" + "---|" * (len(per_run) + 1)]
    for r in rounds:
        cells = []
        for recs in per_run.values():
            rec = recs.get(r)
            if rec is None:
                cells.append("–")
                continue
            precision = rec.get("label_precision_kept")
            cells.append(f"{rec.get('frontier')} ({precision:.2f})" if precision is not None else f"{rec.get('frontier')}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
