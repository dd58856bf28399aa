"""Which label-free signal keeps right sums? A probe of saved addition models (no training).

    python bench/probe_agreement.py RUN_DIR RUN_DIR RUN_DIR --round 3 --levels 6 7 [--n 400]

For fresh reversed-addition problems at each level, with each run's round-N model (its
``round-NNN/optimize/model``): the share of problems each signal keeps and the ground-truth
precision of the kept answers, for the model's own 5/5 vote (5 samples at temperature 0.7, as
``loop=addition`` labels), the same greedy answer with the operands swapped (commutativity),
both, and the agreement of every run's greedy answer (the runs as independently seeded
voters, as ``loop=addition_ensemble`` labels). docs/study.md, section 1, reports one such probe.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--levels", nargs="+", type=int, default=[6, 7])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()

    import torch

    import selfloop_plugins.models.abacus  # noqa: F401  registers the Abacus model type
    from selfloop.model import ModelHandle
    from selfloop_plugins.tasks.addition import Addition, AdditionConfig

    task = Addition(AdditionConfig(answer_slack=0))  # as the presets generate: at most the longest possible sum

    torch.manual_seed(args.seed)
    models = [ModelHandle.load(run / f"round-{args.round:03d}" / "optimize" / "model", device="cpu") for run in args.runs]
    rng = random.Random(args.seed)
    print("| level | run | signal | kept | precision |\n|---|---|---|---|---|")
    for level in args.levels:
        problems = task.sample(rng, level, args.n)
        prompts = [p.prompt for p in problems]
        swapped = ["+".join(reversed(p.prompt.rstrip("=").split("+"))) + "=" for p in problems]
        truth = [p.reference for p in problems]
        budget = task.max_new_tokens(level)
        greedy = [[o[0] for o in m.generate(prompts, max_new_tokens=budget)] for m in models]
        greedy_swapped = [[o[0] for o in m.generate(swapped, max_new_tokens=budget)] for m in models]
        samples = [m.generate(prompts, n=5, temperature=0.7, max_new_tokens=budget) for m in models]
        all_agree = [len({g[i] for g in greedy}) == 1 for i in range(len(problems))]

        def row(run: str, signal: str, keep: list[bool], answers: list[str]) -> None:
            kept = [i for i, k in enumerate(keep) if k]
            precision = sum(answers[i] == truth[i] for i in kept) / len(kept) if kept else float("nan")
            print(f"| {level} | {run} | {signal} | {len(kept) / len(problems):.2f} | {precision:.3f} |")

        for r, run in enumerate(args.runs):
            vote = [len(set(samples[r][i])) == 1 for i in range(len(problems))]
            swap = [greedy[r][i] == greedy_swapped[r][i] for i in range(len(problems))]
            row(run.name, "greedy (no filter)", [True] * len(problems), greedy[r])
            row(run.name, "own 5/5 vote", vote, greedy[r])
            row(run.name, "same answer for b+a", swap, greedy[r])
            row(run.name, "vote and b+a", [v and s for v, s in zip(vote, swap)], greedy[r])
        row("all", f"all {len(models)} runs' greedy answers agree", all_agree, greedy[0])


if __name__ == "__main__":
    main()
