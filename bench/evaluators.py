"""Benchmark the evaluation layer: which evaluator ranks candidates like ground truth?

    python bench/evaluators.py [--seeds 0 1 2] [--rounds 4] [--advance always|paced] [--steps 100]
                               [--out runs/bench-evaluators] [--threads 1]

Target (issue 10): on the embedded task (reversal) **without the round-trip filter**, at least
one evaluator or combination ranks candidates — every round's candidate, promoted or
rejected, across seeds — with Spearman >= 0.9 against ground-truth accuracy at the
curriculum level, where plain self-consistency does not.

1. Candidates: smoke-size runs (``loop=smoke``, ``filter=[uncertainty]``, the curriculum
   ``--advance`` (paced: the level waits until 80% of its rows pass the filter; always: one
   level a round), ``loop.promotion.tolerance=0`` so that some candidates are rejected,
   ``--steps`` optimizer steps a round), one per seed. The runs evaluate with ``self_consistency`` and ``exact_match`` only;
   the drift guard is told not to stop them (``SELFLOOP_DRIFT_STOP=never``).
2. Each candidate (``round-NNN/optimize/model``) is then scored by every evaluator at its
   round's curriculum level L (``loop.eval_levels=[L]``), 64 fixed prompts per evaluator
   (``adversarial``: 16 base problems x 5 perturbations), with the run directory as context —
   so ``reward_model`` trains on each run's round-0 model as it would in the loop. Ground
   truth: ``exact_match`` on 400 problems at L.
3. Spearman's rho per evaluator (and per ``multi`` dimension) over all candidates, plus the
   mean of the per-seed rhos; ``meta``'s trust rule (rho >= 0.6) applied to the pooled rho.

Prints a JSON summary (also written to OUT/summary.json); docs/evaluation.md records the
numbers. The machine is shared: timings are wall-clock on whatever else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EVALUATORS = ["self_consistency", "multi", "adversarial", "reward_model", "safety_gate"]
SIZES = [
    "evaluate.self_consistency.n_per_level=64",
    "evaluate.multi.n_per_level=64",
    "evaluate.adversarial.n_per_level=16",
    "evaluate.reward_model.n_per_level=64",
    "evaluate.reward_model.train_levels=[2,3,4,5,6]",
    "evaluate.safety_gate.n_per_level=16",
    "evaluate.exact_match.n_per_level=400",
]


def produce(run_dir: Path, seed: int, rounds: int, advance: str, steps: int) -> dict:
    from selfloop.config import compose
    from selfloop.loop import Loop
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir

    plugins = load_plugins(strict=True)
    cfg = compose(["loop=smoke", f"seed={seed}", f"loop.rounds={rounds}", "filter=[uncertainty]", f"loop.curriculum.advance={advance}",
                   "loop.promotion.tolerance=0.0", f"optimize.sft.max_steps={steps}", "evaluate=[self_consistency,exact_match]"], plugins.registry)
    started = time.monotonic()
    status = Loop(cfg, RunDir(run_dir), plugins, echo=lambda s: print(f"  seed {seed}: {s}", flush=True)).execute()
    return {"status": status, "seconds": round(time.monotonic() - started, 1)}


def score_run(run_dir: Path, seed: int) -> list[dict]:
    """Every candidate of one run scored by every evaluator at its curriculum level."""
    from selfloop.config import compose
    from selfloop.loop import Loop
    from selfloop.model import ModelHandle
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir

    plugins = load_plugins(strict=True)
    rd = RunDir(run_dir)
    cfg = compose(["loop=smoke", f"seed={seed}", f"evaluate=[{','.join(EVALUATORS)},exact_match]", *SIZES], plugins.registry)
    ctx = Loop(cfg, rd, plugins, echo=lambda s: None).ctx
    out = []
    for record in rd.records():
        r = record["round"]
        metrics = rd.stage_metrics(r, "evaluate")
        if metrics.get("skipped"):
            continue
        level = metrics["level"]
        model = ModelHandle.load(rd.stage_dir(r, "optimize") / "model", device="cpu")
        ctx.round, ctx.level, ctx.stage, ctx.model = r, level, "evaluate", model
        ctx.run.loop.eval_levels = [level]
        row = {"seed": seed, "round": r, "level": level, "promoted": record["promoted"], "scores": {}, "seconds": {}, "generated_tokens": {}}
        for evaluator in ctx.strategies["evaluate"]:
            before, started = ModelHandle.generated_tokens, time.monotonic()
            res = evaluator.evaluate(ctx, model)
            row["seconds"][evaluator.name] = round(time.monotonic() - started, 2)
            row["generated_tokens"][evaluator.name] = ModelHandle.generated_tokens - before
            value = (res.get("by_level") or {}).get(str(level), res["score"])
            if evaluator.name == "exact_match":
                row["truth"] = value
                continue
            row["scores"][evaluator.name] = value
            for dim, by_level in (res.get("by_dimension") or {}).items():
                row["scores"][f"{evaluator.name}.{dim}"] = by_level[str(level)]
        ctx.notes.clear()
        print(f"  seed {seed} round {r} (level {level}, {'promoted' if record['promoted'] else 'rejected'}): truth {row['truth']:.3f} "
              + " ".join(f"{k}={v:.3f}" for k, v in row["scores"].items()), flush=True)
        out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=f"runs/bench-evaluators-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--advance", choices=["paced", "always"], default="always", help="the curriculum of the candidate runs")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per round of the candidate runs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SELFLOOP_DRIFT_STOP"] = "never"  # measure the candidates, do not guard them
    import torch

    from selfloop.progress import quiet_libraries
    from selfloop_plugins.evaluate.meta import MetaConfig, spearman

    torch.set_num_threads(args.threads)
    quiet_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs = {}
    for seed in args.seeds:
        run_dir = out / f"seed-{seed}"
        if not (run_dir / "run.json").exists() or json.loads((run_dir / "run.json").read_text()).get("status") != "completed":
            runs[seed] = produce(run_dir, seed, args.rounds, args.advance, args.steps)
    produced = time.monotonic() - started
    rows = [row for seed in args.seeds for row in score_run(out / f"seed-{seed}", seed)]
    scored = time.monotonic() - started - produced
    names = list(rows[0]["scores"])
    truth = [r["truth"] for r in rows]
    threshold = MetaConfig().min_spearman
    table = {}
    for n in names:
        pooled = spearman([r["scores"][n] for r in rows], truth)
        per_seed = [spearman([r["scores"][n] for r in rows if r["seed"] == s], [r["truth"] for r in rows if r["seed"] == s]) for s in args.seeds]
        per_seed = [v for v in per_seed if v is not None]
        base = n.split(".")[0]
        table[n] = {
            "spearman": None if pooled is None else round(pooled, 3),
            "mean_per_seed_spearman": round(sum(per_seed) / len(per_seed), 3) if per_seed else None,
            "trusted_by_meta_rule": None if pooled is None else pooled >= threshold,
            "seconds_per_candidate": round(sum(r["seconds"][base] for r in rows) / len(rows), 2),
            "generated_tokens_per_candidate": round(sum(r["generated_tokens"][base] for r in rows) / len(rows)),
        }
    best = max((n for n in names if table[n]["spearman"] is not None), key=lambda n: table[n]["spearman"])
    sc = table["self_consistency"]["spearman"]
    summary = {
        "candidates": len(rows),
        "rejected": sum(not r["promoted"] for r in rows),
        "levels": sorted({r["level"] for r in rows}),
        "truth_range": [round(min(truth), 3), round(max(truth), 3)],
        "spearman": table,
        "best": best,
        "target_met": table[best]["spearman"] >= 0.9 and (sc is None or sc < 0.9),
        "produce_seconds": round(produced, 1),
        "score_seconds": round(scored, 1),
        "runs": runs,
        "threads": args.threads,
        "advance": args.advance,
        "steps": args.steps,
        "candidates_detail": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "candidates_detail"}, indent=2))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
