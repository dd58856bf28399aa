"""Test-time compute on the embedded task: best-of-N and self-correction, accuracy against
samples and turns, at difficulty levels where the model is uncertain.

    python bench/test_time_compute.py [--run-dir DIR] [--levels 7,8] [--prompts 200]

The model is a run's promoted model (``--run-dir``); without one the bench first runs the
embedded default's bootstrap alone (``selfloop run loop.rounds=0``: the tiny NoPE model
trained on reversal lengths 1-6 with references, about 2 CPU-minutes) into
``runs/bench-ttc-bootstrap`` and reuses it afterwards. Levels: by default the first levels
above the bootstrap where greedy accuracy lies between 10% and 90%.

Measured per level on the same seeded prompts (accuracy is ground-truth exact match, used
only to measure): greedy; ``best_of_n`` with n in ``--ns`` for ``select_by`` logprob,
majority and roundtrip, plus pass@n (some sample is right: what a perfect verifier would
reach); ``self_correction`` with max_turns in ``--turns`` for the roundtrip and well_formed
critics (resampled revisions, 4 samples a turn). Every setting also reports the sequences
generated per prompt (critic checks included). Writes ``docs/img/test-time-compute.png``
and prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_run(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists():
        return
    print(f"training the bootstrap model into {run_dir} (selfloop run loop.rounds=0)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "selfloop.cli", "run", "loop.rounds=0", f"hydra.run.dir={run_dir}"], check=True)


def measure(ctx, refiner, prompts, references, max_new_tokens, seed=0) -> dict:
    from selfloop.context import seed_everything
    from selfloop.model import ModelHandle

    ctx.strategies["refine"] = [refiner] if refiner is not None else []
    ctx.notes = {}
    seed_everything(seed)
    ctx.rng = random.Random(seed)
    before = ModelHandle.generated_sequences
    gens = ctx.generate(prompts, max_new_tokens=max_new_tokens)
    accuracy = sum(ctx.task.check(g.answer, r) for g, r in zip(gens, references)) / len(prompts)
    return {"accuracy": round(accuracy, 4), "sequences_per_prompt": round((ModelHandle.generated_sequences - before) / len(prompts), 2),
            "gens": gens, "notes": ctx.notes}


def choose_levels(ctx, n: int) -> list[int]:
    from selfloop.context import seed_everything

    chosen = []
    top = max(ctx.run.loop.bootstrap.levels or ctx.task.bootstrap_levels)
    for level in [v for v in ctx.task.levels if v > top][:6]:
        problems = ctx.task.sample(random.Random(f"ttc:{level}"), level, n)
        seed_everything(0)
        outs = ctx.model.generate([p.prompt for p in problems], max_new_tokens=ctx.task.max_new_tokens(level))
        acc = sum(ctx.task.check(o[0], p.reference) for o, p in zip(outs, problems)) / n
        if 0.1 <= acc <= 0.9:
            chosen.append(level)
        if acc < 0.1 or len(chosen) == 2:
            break
    return chosen or [top + 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-ttc-bootstrap"))
    parser.add_argument("--levels", help="comma-separated (default: up to two uncertain levels above the bootstrap)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--ns", default="1,2,4,8,16,32")
    parser.add_argument("--turns", default="0,1,2,4,8")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "test-time-compute.png"))
    parser.add_argument("--replot", metavar="JSON", help="redraw the plot from a saved output of this script, measuring nothing")
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    turns = [int(x) for x in args.turns.split(",")]
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(_int_keys(saved), ns, turns, Path(args.plot))
        return

    from selfloop.infer import build_context
    from selfloop_plugins.refine.best_of_n import BestOfN, BestOfNConfig
    from selfloop_plugins.refine.self_correction import SelfCorrection, SelfCorrectionConfig

    run_dir = Path(args.run_dir)
    ensure_run(run_dir)
    ctx, round_ = build_context(run_dir, "cpu")
    levels = [int(x) for x in args.levels.split(",")] if args.levels else choose_levels(ctx, args.prompts)
    started = time.perf_counter()
    results: dict = {"run_dir": str(run_dir), "model_round": round_, "prompts_per_level": args.prompts, "levels": {}}
    for level in levels:
        problems = ctx.task.sample(random.Random(f"ttc:{level}"), level, args.prompts)
        prompts, refs = [p.prompt for p in problems], [p.reference for p in problems]
        mnt = ctx.task.max_new_tokens(level)
        row: dict = {"greedy": measure(ctx, None, prompts, refs, mnt)["accuracy"], "best_of_n": {}, "pass_at_n": {}, "self_correction": {}}
        for select_by in ("logprob", "majority", "roundtrip"):
            row["best_of_n"][select_by] = {}
            for n in ns:
                m = measure(ctx, BestOfN(BestOfNConfig(n=n, select_by=select_by)), prompts, refs, mnt)
                row["best_of_n"][select_by][n] = {k: m[k] for k in ("accuracy", "sequences_per_prompt")}
                if select_by == "logprob":  # the same samples: would any of them do?
                    hit = sum(any(ctx.task.check(c, r) for c in g.completions) for g, r in zip(m["gens"], refs))
                    row["pass_at_n"][n] = round(hit / len(prompts), 4)
        for critic in ("roundtrip", "well_formed"):
            row["self_correction"][critic] = {}
            for t in turns:
                m = measure(ctx, SelfCorrection(SelfCorrectionConfig(critic=critic, max_turns=t)), prompts, refs, mnt)
                notes = m["notes"].get("self_correction", {})
                row["self_correction"][critic][t] = {"accuracy": m["accuracy"], "sequences_per_prompt": m["sequences_per_prompt"],
                                                     "hit_turn_limit": notes.get("hit_turn_limit", 0) / len(prompts),
                                                     "revised": notes.get("revised", 0) / len(prompts)}
        results["levels"][level] = row
        print(f"level {level} done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - started, 1)
    plot(results, ns, turns, Path(args.plot))
    results["plot"] = str(Path(args.plot).relative_to(ROOT)) if Path(args.plot).is_relative_to(ROOT) else args.plot
    print(json.dumps(results, indent=2))


def _int_keys(obj):
    """JSON turned the integer keys (n, turns, levels) into strings: turn them back."""
    if isinstance(obj, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in obj.items()}
    return obj


def plot(results: dict, ns: list[int], turns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"logprob": "-", "majority": "--", "roundtrip": "-."}
    critics = {"roundtrip": "-.", "well_formed": ":"}
    top = 0.0
    for color, (level, row) in zip(colors, results["levels"].items()):
        for select_by, line in styles.items():
            ys = [row["best_of_n"][select_by][n]["accuracy"] for n in ns]
            left.plot(ns, ys, line, color=color, marker="o", ms=3, label=f"length {level}: select_by={select_by}")
        passes = [row["pass_at_n"][n] for n in ns]
        left.plot(ns, passes, ":", color=color, alpha=0.5, label=f"length {level}: pass@n (a perfect verifier)")
        left.axhline(row["greedy"], color=color, lw=0.8, alpha=0.4)
        for critic, line in critics.items():
            ys = [row["self_correction"][critic][t]["accuracy"] for t in turns]
            middle.plot(turns, ys, line, color=color, marker="s", ms=3, label=f"length {level}: critic={critic}")
        middle.axhline(row["greedy"], color=color, lw=0.8, alpha=0.4)
        top = max(top, *passes, row["greedy"])
    level, row = next(iter(results["levels"].items()))  # compute-normalised view of the first level
    for select_by, line in styles.items():
        pts = [row["best_of_n"][select_by][n] for n in ns]
        right.plot([p["sequences_per_prompt"] for p in pts], [p["accuracy"] for p in pts], line, marker="o", ms=3, label=f"best_of_n {select_by}")
    for critic, line in critics.items():
        pts = [row["self_correction"][critic][t] for t in turns]
        right.plot([p["sequences_per_prompt"] for p in pts], [p["accuracy"] for p in pts], line, marker="s", ms=3, label=f"self_correction {critic}")
    right.axhline(row["greedy"], color="grey", lw=0.8, label="greedy (1 sequence)")
    ylim = (0, min(1.0, top + 0.12))
    left.set_xscale("log", base=2)
    left.set_xticks(ns, [str(n) for n in ns])
    left.set(title="best_of_n: accuracy vs n (thin lines: greedy)", xlabel="n (samples per prompt)", ylabel="exact match", ylim=ylim)
    middle.set(title="self_correction: accuracy vs max_turns", xlabel="max_turns (each revision: 4 samples)", ylabel="exact match", ylim=ylim)
    middle.set_xticks(turns)
    right.set_xscale("log", base=2)
    right.set(title=f"length {level}: accuracy vs sequences generated", xlabel="sequences per prompt (critic checks included)", ylabel="exact match", ylim=ylim)
    left.legend(fontsize=6.5, loc="center", bbox_to_anchor=(0.5, 0.3), ncol=2)
    middle.legend(fontsize=6.5, loc="center")
    right.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(f"Test-time compute on reversal with the promoted model of {Path(results['run_dir']).name} (round {results['model_round']}; "
                 f"the bootstrap trains lengths 1-6), {results['prompts_per_level']} prompts per length, exact match against references", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
