"""Filter-chain ablation: which filters keep the loop's self-labels true, and how much do seeds vary?

    python bench/ablation.py --out runs/ablation-reversal --rounds 6 \\
        --chains "[]" "[uncertainty]" "[uncertainty,roundtrip]" --seeds 0 1 2 [-- OVERRIDE...]

The design is a sweep of filter chains x seeds, the same grid as
``selfloop run -m filter=[],[uncertainty],[uncertainty,roundtrip] seed=0,1,2``, with one
saving: the jobs of a seed share that seed's bootstrap. Round 0 (the labelled bootstrap) does
not filter, so every chain would train the same round-0 model for a seed; it is trained once
(``selfloop run ... loop.rounds=0`` into OUT/bootstrap/seed-S), copied into each job's
directory, and the job's own config (chain, seed, rounds) is saved there before
``selfloop resume`` runs rounds 1..R. That saves (chains - 1) x seeds bootstraps and makes the
comparison within a seed exact: the chains start from the same model.

Overrides after ``--`` apply to every run; an option of a filter (``filter.quality.threshold=0.5``)
goes only to the chains that select that filter, never to the bootstrap (round 0 does not filter).

Jobs are numbered like a Hydra sweep (OUT/sweep/0, 1, ...; seed-major) and run ``--jobs`` at a
time with ``--threads`` torch threads each (jobs x threads <= cores); a seed's jobs start as
soon as its bootstrap is done. At the end ``selfloop compare``
writes OUT/sweep/comparison/ (table, across-seed table, label-free-gate-vs-truth Spearman per
evaluator, plots), and the script OUT/per_round.md (frontier and kept-label precision per chain
and round, mean ± sd over seeds) and OUT/per_filter.md (per filter: rows dropped, label
precision of what it kept and dropped, share of the wrong labels it removed). A job that fails
is reported and the others go on; rerunning the script skips finished bootstraps and jobs and
resumes unfinished ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def selfloop(*args: str, threads: int, log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as fh:
        return subprocess.run([sys.executable, "-m", "selfloop.cli", *args], env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


def status(run_dir: Path) -> str | None:
    from selfloop.errors import RunDirError
    from selfloop.rundir import RunDir

    try:
        return RunDir(run_dir).read_run_json().get("status")
    except RunDirError:  # not started yet, or run.json unreadable
        return None


def bootstrap(out: Path, seed: int, base: list[str], threads: int) -> Path:
    run_dir = out / "bootstrap" / f"seed-{seed}"
    if status(run_dir) == "completed":
        return run_dir
    if run_dir.exists():
        code = selfloop("resume", str(run_dir), threads=threads, log=out / "bootstrap" / f"seed-{seed}.log")
    else:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        code = selfloop("run", *base, f"seed={seed}", "loop.rounds=0", f"hydra.run.dir={run_dir}", threads=threads,
                        log=out / "bootstrap" / f"seed-{seed}.log")
    if code != 0 or status(run_dir) != "completed":
        raise SystemExit(f"the bootstrap of seed {seed} failed (exit {code}): see {out / 'bootstrap' / f'seed-{seed}.log'}")
    return run_dir


_COMPOSE = threading.Lock()  # Hydra's global state: one composition at a time


def prepare_job(job_dir: Path, boot: Path, overrides: list[str]) -> None:
    """Copy the seed's bootstrap (round 0 of ``boot``, a run directory: later rounds and the
    files derived from them are left behind) into the job directory and save the job's own
    config there."""
    from omegaconf import OmegaConf

    from selfloop.config import compose
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir, atomic_write_text

    with _COMPOSE:
        cfg = compose(overrides, load_plugins().registry)  # one-line errors for a bad chain or option, before copying
    tmp = job_dir.with_name(job_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def round_zero_only(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != Path(boot):
            return set()
        return {n for n in names if n in DERIVED or (n.startswith("round-") and n != "round-000")}

    shutil.copytree(boot, tmp, ignore=round_zero_only)
    atomic_write_text(tmp / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(tmp / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    rd = RunDir(tmp)
    rd.write_run_json(status="interrupted", config_sha256=rd.config_digest(), bootstrap_from=str(boot))
    tmp.rename(job_dir)


# files of the source run derived from its later rounds; the job's own run rebuilds them
DERIVED = {"run.lock", "report.md", "curves.png", "metrics.jsonl", "drift.jsonl", "observers.json", "selfloop.log"}


def for_chain(overrides: list[str], chain: str) -> list[str]:
    """The overrides without options of filters the chain does not select, so that
    ``-- filter.quality.threshold=0.5`` configures the chains that have ``quality`` (an option of
    an unselected strategy is an error in ``selfloop run``)."""
    selected = {name.strip() for name in chain.strip("[]").split(",") if name.strip()}
    return [o for o in overrides if not (o.startswith("filter.") and o.split(".")[1].split("=")[0] not in selected)]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="default", help="loop preset (loop=...)")
    parser.add_argument("--task", default="reversal")
    parser.add_argument("--chains", nargs="+", default=["[]", "[uncertainty]", "[uncertainty,roundtrip]"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only-seeds", nargs="+", type=int, help="run only these seeds' jobs (e.g. in a second process), numbered as in the full grid")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    base = [f"loop={args.preset}", f"task={args.task}", *extra]
    boot_base = for_chain(base, "[]")  # round 0 does not filter
    out = args.out.resolve()
    start = time.time()
    grid = [(chain, seed) for seed in args.seeds for chain in args.chains]  # seed-major: a seed's jobs start once its bootstrap is done
    sweep = out / "sweep"
    sweep.mkdir(parents=True, exist_ok=True)

    def run_job(i: int, boot) -> tuple[int, int, str]:
        chain, seed = grid[i]
        job = sweep / str(i)
        if not job.exists():
            prepare_job(job, boot.result(), [*for_chain(base, chain), f"filter={chain}", f"seed={seed}", f"loop.rounds={args.rounds}"])
        if status(job) == "completed":
            return i, 0, "completed"
        code = selfloop("resume", str(job), threads=args.threads, log=sweep / f"{i}.log")
        return i, code, status(job) or "?"

    seeds = args.only_seeds or args.seeds
    mine = [i for i, (_, seed) in enumerate(grid) if seed in seeds]
    print(f"{len(seeds)} bootstraps, then {len(mine)} jobs; {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        # FIFO: every bootstrap starts before any job, so a job waiting for its bootstrap never blocks it
        boots = {s: pool.submit(bootstrap, out, s, boot_base, args.threads) for s in seeds}
        jobs = [pool.submit(run_job, i, boots[grid[i][1]]) for i in mine]
        for future in jobs:
            i, code, final = future.result()
            chain, seed = grid[i]
            print(f"  job {i}: filter={chain} seed={seed}: {final}" + (f" (exit {code}; see {sweep / f'{i}.log'})" if code else "")
                  + f"  [{(time.time() - start) / 60:.1f} min]", flush=True)
    subprocess.run([sys.executable, "-m", "selfloop.cli", "compare", str(sweep)], check=False)
    runs = load_sweep(sweep, len(grid))
    for name, table in (("per_round.md", per_round_table(runs)), ("per_filter.md", per_filter_table(runs))):
        (out / name).write_text(table)
        print(table)


def load_sweep(sweep: Path, jobs: int) -> list:
    """The sweep's job runs that exist (selfloop.compare.Run), each read once for both tables."""
    from selfloop.compare import load_run

    return [load_run(sweep / str(i)) for i in range(jobs) if (sweep / str(i)).exists()]


def per_round_table(runs: list) -> str:
    """Per chain and round: frontier and kept-label precision, mean ± sd over seeds (the
    comparison's tables give the final values; this shows the avalanche round by round)."""
    import math
    import statistics

    from selfloop.compare import setting_value

    by_chain: dict[str, list[dict[str, list]]] = {}  # chain -> each seed's per-round series, as compare plots them
    for run in runs:
        by_chain.setdefault(setting_value(run, "filter"), []).append(run.series())

    def cell(values: list[float]) -> str:
        if not values:
            return "–"
        sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{sd}"

    rounds = max((len(s["round"]) for runs in by_chain.values() for s in runs), default=0)
    lines = ["| filter chain | seeds | " + " | ".join(f"round {k}" for k in range(1, rounds)) + " |", "|---|---|" + "---|" * (rounds - 1)]
    for chain, runs in by_chain.items():
        for key, name in (("frontier", "frontier"), ("precision", "precision (kept)")):
            cells = [cell([s[key][k] for s in runs if len(s[key]) > k and not math.isnan(s[key][k])]) for k in range(1, rounds)]
            lines.append(f"| {chain} {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_filter_table(runs: list) -> str:
    """Per chain and filter, over every label-free round of every seed: how many rows it saw and
    dropped, the label precision of what came in, was kept and was dropped, and the share of
    the wrong labels reaching it that it removed. A filter that drops at random drops rows as
    right as those it keeps; one that finds errors drops rows of lower precision."""
    from selfloop.compare import setting_value

    totals: dict[tuple[str, str], list[float]] = {}  # (chain, filter) -> rows in, dropped, right kept, right dropped
    for run in runs:
        chain = setting_value(run, "filter")
        for record in run.records:
            for step in record.get("funnel") or []:
                kept, seen = step["kept"], step["of"]
                precision_kept, precision_dropped = step.get("precision_kept"), step.get("precision_dropped")
                if record["round"] == 0 or (kept and precision_kept is None) or (seen > kept and precision_dropped is None):
                    continue  # the bootstrap, or precision not measured
                t = totals.setdefault((chain, step["filter"]), [0, 0, 0.0, 0.0])
                t[0] += seen
                t[1] += seen - kept
                t[2] += kept * (precision_kept or 0.0)
                t[3] += (seen - kept) * (precision_dropped or 0.0)

    def share(num: float, den: float) -> str:
        return f"{num / den:.3f}" if den else "–"

    lines = ["| filter chain | filter | rows in | dropped | precision in | precision kept | precision dropped | wrong labels removed |",
             "|---|---|---|---|---|---|---|---|"]
    for (chain, name), (seen, dropped, right_kept, right_dropped) in totals.items():
        wrong_in = seen - right_kept - right_dropped
        lines.append(f"| {chain} | {name} | {seen} | {dropped} ({share(dropped, seen)}) | {share(right_kept + right_dropped, seen)} | "
                     f"{share(right_kept, seen - dropped)} | {share(right_dropped, dropped)} | {share(dropped - right_dropped, wrong_in)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
