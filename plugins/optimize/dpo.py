"""Self-rewarding preference optimization (Yuan et al. 2024, "Self-Rewarding Language Models")
with TRL's DPOTrainer, and its SPIN variant (Chen et al. 2024, "Self-Play Fine-Tuning").

``pairs: self_reward``: for each row the model's own samples (the ``completions`` column,
sampled by the acquirer through the refiners) are ranked, without labels, by agreement with
the majority answer (``rank_by: majority``) or by a configured label-free evaluator
(``rank_by: <evaluator name>``, e.g. a judge); the best well-formed answer becomes ``chosen``,
the worst ``rejected``. Rows whose samples all give the same answer, or whose best and worst
answers score the same, make no pair: they are dropped and counted (``notes.dpo``).

``pairs: spin``: the reference answer is ``chosen`` and the model's own most frequent other
answer ``rejected``. It reads ground truth, so it runs only when the run sets
``loop.allow_references_in_training=true``; the loop counts every reference used.

The candidate starts as a copy of the incumbent; the DPO reference policy is a frozen copy of
the incumbent, so the KL anchor keeps the candidate near what it already knows (why this
optimizer mixes in no replay of earlier rounds: their rows passed filters that keep agreeing
samples, so they hold no pairs). No pair at all raises StarvedRound: the loop records a
starved round rather than train on nothing. Round 0 (labelled rows, no samples) trains with sft.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import ContractError, OptionError, SelfloopError
from selfloop.strategy import Optimizer
from selfloop_plugins.optimize._shared import check_bootstrap, check_range
from selfloop_plugins.optimize.sft import LR_SCHEDULERS

PAIRINGS = ("self_reward", "spin")


@dataclass
class DPOConfig:
    # how samples are ranked: "majority" (vote share) or a configured label-free evaluator's name
    rank_by: str = "majority"
    # self_reward: best vs worst own sample (Yuan et al.); spin: reference vs own answer (Chen et al.)
    pairs: str = "self_reward"
    # chosen answers must pass the task's format check (a malformed majority makes no pair)
    require_well_formed: bool = True
    beta: float = 0.1
    # weight of an NLL term on the chosen answer (RPO, Pang et al. 2024); 0: plain DPO
    sft_weight: float = 1.0
    max_steps: int = 200
    # at most this many passes over the pairs: DPO over-optimizes a few pairs and loses accuracy
    max_epochs: float = 4.0
    batch_size: int = 32
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_range("rank_by", self.rank_by, bool(self.rank_by), "majority or the name of a configured label-free evaluator")
        check_range("pairs", self.pairs, self.pairs in PAIRINGS, ", ".join(PAIRINGS))
        check_range("beta", self.beta, self.beta > 0, "a number > 0")
        check_range("sft_weight", self.sft_weight, self.sft_weight >= 0, "a number >= 0")
        check_range("max_steps", self.max_steps, self.max_steps >= 1, "an integer >= 1")
        check_range("max_epochs", self.max_epochs, self.max_epochs > 0, "a number > 0")
        check_range("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        check_range("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0")
        check_range("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio <= 1, "a number in [0, 1]")
        check_range("lr_scheduler", self.lr_scheduler, self.lr_scheduler in LR_SCHEDULERS, ", ".join(LR_SCHEDULERS))


def distinct_answers(task, completions: list[str]) -> dict[str, tuple[str, int]]:
    """{answer: (its first completion, votes)}, in order of first appearance."""
    votes = Counter(task.extract_answer(c) for c in completions)
    out: dict[str, tuple[str, int]] = {}
    for c in completions:
        a = task.extract_answer(c)
        if a not in out:
            out[a] = (c, votes[a])
    return out


class DPO(Optimizer):
    name = "dpo"
    Config = DPOConfig

    def setup(self, ctx):
        c = self.config
        check_bootstrap(ctx, self.name)
        if c.pairs == "spin":
            if not getattr(ctx.task, "has_references", True):
                raise SelfloopError(f"optimize.dpo.pairs=spin pairs reference answers with the model's own, and task {ctx.task.name!r} has no references")
            if not ctx.run.loop.allow_references_in_training:
                raise SelfloopError(
                    "optimize.dpo.pairs=spin trains on reference answers (SPIN: reference vs own answer); it runs only when the run "
                    "allows references in training: set loop.allow_references_in_training=true (every label is counted)"
                )
            return
        if c.rank_by != "majority":
            evaluators = {e.name: e for e in ctx.strategies.get("evaluate", [])}
            if c.rank_by not in evaluators:
                raise OptionError("rank_by", c.rank_by, f"majority or a configured evaluator ({', '.join(sorted(evaluators)) or 'none configured'})")
            if getattr(evaluators[c.rank_by], "uses_references", False):
                raise OptionError("rank_by", c.rank_by, f"majority or a label-free evaluator; {c.rank_by!r} reads references (use pairs=spin to train on them)")
        for f in ctx.strategies.get("filter", []):
            signal = getattr(f.config, "signal", "agreement")
            if f.name == "uncertainty" and signal == "agreement" and getattr(f.config, "min_agreement", 0) >= 1.0:
                raise SelfloopError(
                    "optimize.dpo pairs the model's disagreeing samples, but filter.uncertainty.min_agreement=1.0 keeps only rows whose "
                    "samples all agree, so no pair would ever be found; lower it (e.g. filter.uncertainty.min_agreement=0.5, as "
                    "+recipe=self_rewarding does) or leave the filter out"
                )

    # -- pairs -------------------------------------------------------------------------
    def scores(self, ctx, data, candidates: dict[int, dict[str, tuple[str, int]]]) -> dict[int, dict[str, float]]:
        """{row: {answer: score}} for the rows with several answers: an answer's vote share,
        or the configured evaluator's score of it."""
        if self.config.rank_by == "majority":
            return {i: {a: votes / sum(v for _, v in row.values()) for a, (_, votes) in row.items()} for i, row in candidates.items()}
        from selfloop.data import make_rows

        evaluator = ctx.strategy("evaluate", self.config.rank_by)
        flat = [(i, a) for i, row in candidates.items() for a in row]
        out: dict[int, dict[str, float]] = {i: {} for i in candidates}
        if not flat:
            return out
        ids, prompts, completions, levels = data["id"], data["prompt"], data["completions"], data["difficulty"]
        rows = make_rows(
            dict(id=f"{ids[i]}#{k}", prompt=prompts[i], completions=completions[i], answer=a, difficulty=levels[i], round=ctx.round, source="dpo/candidate")
            for k, (i, a) in enumerate(flat)
        )
        got = evaluator.score(ctx, rows)
        culprit = ctx.registry.describe("evaluate", evaluator.name)
        if not isinstance(got, (list, tuple)) or len(got) != len(flat):
            count = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
            raise ContractError(f"{culprit} score() returned {count} values for {len(flat)} candidate answers; expected one per row")
        for (i, a), value in zip(flat, got):
            value = float(value)
            if value != value:  # NaN: the evaluator could not score this answer
                ctx.row_error(self.name, ids[i], f"{evaluator.name} gave no score (NaN) to answer {a!r}")
                continue
            out[i][a] = value
        return out

    def self_reward_pairs(self, ctx, data) -> tuple[list[tuple[str, str, str]], Counter]:
        task, counts = ctx.task, Counter()
        answers = [distinct_answers(task, list(cs)) for cs in data["completions"]]
        counts["equal_answers"] = sum(len(row) < 2 for row in answers)
        scored = self.scores(ctx, data, {i: row for i, row in enumerate(answers) if len(row) >= 2})
        pairs, prompts = [], data["prompt"]
        for i, score in scored.items():
            prompt, row = prompts[i], answers[i]
            eligible = [a for a in score if not self.config.require_well_formed or task.is_well_formed(prompt, a)]
            if not eligible:
                counts["no_well_formed_answer"] += 1
                continue
            best = max(eligible, key=lambda a: score[a])
            worst = min(score, key=lambda a: score[a])
            if score[best] <= score[worst]:
                counts["tied_scores"] += 1
                continue
            pairs.append((prompt, row[best][0], row[worst][0]))
        return pairs, +counts

    def spin_pairs(self, ctx, data) -> tuple[list[tuple[str, str, str]], Counter]:
        task, counts = ctx.task, Counter()
        pairs = []
        for prompt, completions, answer, reference in zip(data["prompt"], data["completions"], data["answer"], data["reference"]):
            if reference is None:
                counts["no_reference"] += 1
                continue
            counts["references_used"] += 1
            own = [c for c in (list(completions) or [answer]) if not task.check(c, reference)]
            if not own:
                counts["equal_answers"] += 1  # the model already gives the reference answer
                continue
            rejected = Counter(own).most_common(1)[0][0]
            pairs.append((prompt, reference, rejected))
        return pairs, counts

    # -- training ----------------------------------------------------------------------
    def optimize(self, ctx, data):
        from selfloop.errors import StarvedRound
        from selfloop_plugins.optimize._shared import train_bootstrap

        if ctx.round == 0:
            return train_bootstrap(ctx, data, self.name)
        c = self.config
        if c.pairs == "spin" and "reference" not in data.column_names:
            raise SelfloopError("optimize.dpo.pairs=spin got rows without references; set loop.allow_references_in_training=true")
        pairs, counts = (self.spin_pairs if c.pairs == "spin" else self.self_reward_pairs)(ctx, data)
        ctx.record(self.name, rows=len(data), pairs=len(pairs), **dict(counts))
        if not pairs:
            dropped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(counts.items())) or "no rows"
            raise StarvedRound(f"no preference pairs in {len(data)} rows ({dropped}); dpo needs rows whose samples disagree")
        ctx.log.info("dpo: %d preference pairs from %d rows (%s)", len(pairs), len(data), dict(counts))
        return self.train_pairs(ctx, pairs)

    def train_pairs(self, ctx, pairs: list[tuple[str, str, str]]):
        from datasets import Dataset
        from selfloop.training import train
        from selfloop_plugins.optimize._shared import finish, frozen_copy, last_logged, trainer_args
        from trl import DPOConfig as TRLConfig
        from trl import DPOTrainer

        c = self.config
        steps = min(c.max_steps, max(1, math.ceil(c.max_epochs * len(pairs) / c.batch_size)))
        ctx.record(self.name, steps=steps)
        candidate = ctx.model.clone()
        reference_policy = frozen_copy(ctx.model.model)
        tok = candidate.tokenizer
        prompts, chosen, rejected = (list(x) for x in zip(*pairs))
        lengths = [len(x) for x in tok(prompts)["input_ids"]]
        answers = [len(x) + 1 for x in tok(chosen + rejected, add_special_tokens=False)["input_ids"]]
        tokens_per_pair = (2 * sum(lengths) + sum(answers)) / len(pairs)
        losses, weights = (["sigmoid", "sft"], [1.0, c.sft_weight]) if c.sft_weight > 0 else (["sigmoid"], None)
        args = trainer_args(
            TRLConfig, ctx, ctx.checkpoint_dir, candidate.device.type == "cpu",
            max_steps=steps, per_device_train_batch_size=c.batch_size, learning_rate=c.learning_rate,
            lr_scheduler_type=c.lr_scheduler, warmup_steps=int(c.warmup_ratio * steps), max_grad_norm=c.max_grad_norm,
            beta=c.beta, loss_type=losses, loss_weights=weights,
        )
        candidate.model.train()
        trainer = DPOTrainer(
            model=candidate.model, ref_model=reference_policy, args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}), processing_class=tok,
        )
        result = train(ctx, trainer, tokens_per_step=lambda step: round(tokens_per_pair * c.batch_size))
        finish(candidate)
        candidate.train_metrics = {"train_loss": round(float(result.training_loss), 5), "pairs": len(pairs)}
        for key, name in (("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy")):
            value = last_logged(trainer, key)
            if value is not None:
                candidate.train_metrics[name] = round(value, 5)
        return candidate


@hookimpl
def selfloop_register_optimizers(register):
    register(DPO)
