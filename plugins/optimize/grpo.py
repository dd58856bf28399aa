"""Reinforcement learning with self-assessed rewards: TRL's GRPOTrainer (Shao et al. 2024,
DeepSeekMath) on the kept rows' prompts, rewarded without labels.

Each step samples ``num_generations`` completions per prompt from the policy and scores them
with the configured reward functions (``rewards``, summed with ``reward_weights``):

- ``majority``: 1 if the completion's answer is the group's majority answer (test-time RL,
  TTRL, Zuo et al. 2025: the vote of the model's own samples is the pseudo-label);
- ``well_formed``: 1 if the task's label-free format check passes (``is_well_formed``);
- ``roundtrip``: 1 if the policy, asked the task's inverse question about the answer, gives
  back the input (tasks with an ``inverse``, e.g. reversal);
- the name of a configured label-free evaluator (``evaluate=[...]``): its per-row ``score``
  of the answer, e.g. a judge or a reward model;
- ``correct``: ground truth (``task.check`` against the reference): only when the run sets
  ``loop.allow_references_in_training=true``, and the loop counts the labels.

A reward function that returns NaN or the wrong number of values stops training with an error
naming it. ``beta > 0`` adds a KL penalty to a frozen copy of the incumbent (TRL's default is 0,
as in DAPO and Dr. GRPO). Round 0 (labelled rows, nothing to explore) trains with sft.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from selfloop import hookimpl
from selfloop.errors import ContractError, OptionError, SelfloopError
from selfloop.strategy import Optimizer
from selfloop_plugins.optimize._shared import check_bootstrap, check_range
from selfloop_plugins.optimize.sft import LR_SCHEDULERS

CHECKS = ("majority", "well_formed", "roundtrip", "correct")
LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo")
SCALINGS = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    # built-in checks (majority, well_formed, roundtrip; correct needs references) or evaluator names
    rewards: list[str] = field(default_factory=lambda: ["majority", "well_formed"])
    # one weight per reward ([]: all 1.0)
    reward_weights: list[float] = field(default_factory=list)
    num_generations: int = 8
    prompts_per_step: int = 8
    temperature: float = 1.0
    # KL penalty to the incumbent (0: none, no reference model kept)
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_steps: int = 100
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_range("rewards", self.rewards, bool(self.rewards) and len(set(self.rewards)) == len(self.rewards),
                    f"a non-empty list of distinct reward names ({', '.join(CHECKS)} or configured evaluators)")
        check_range("reward_weights", self.reward_weights, not self.reward_weights or len(self.reward_weights) == len(self.rewards),
                    f"[] or one weight per reward ({len(self.rewards)})")
        check_range("num_generations", self.num_generations, self.num_generations >= 2, "an integer >= 2 (GRPO compares completions within a group)")
        check_range("prompts_per_step", self.prompts_per_step, self.prompts_per_step >= 1, "an integer >= 1")
        check_range("temperature", self.temperature, self.temperature > 0, "a number > 0 (GRPO samples)")
        check_range("beta", self.beta, self.beta >= 0, "a number >= 0")
        check_range("loss_type", self.loss_type, self.loss_type in LOSSES, ", ".join(LOSSES))
        check_range("scale_rewards", self.scale_rewards, self.scale_rewards in SCALINGS, ", ".join(SCALINGS))
        check_range("max_steps", self.max_steps, self.max_steps >= 1, "an integer >= 1")
        check_range("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0")
        check_range("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio <= 1, "a number in [0, 1]")
        check_range("lr_scheduler", self.lr_scheduler, self.lr_scheduler in LR_SCHEDULERS, ", ".join(LR_SCHEDULERS))


def checked(name: str, fn):
    """``fn`` as a TRL reward function that fails, naming ``name``, on a wrong count or a
    value that is not a finite number (TRL would silently treat NaN as "not applicable")."""

    def reward(prompts, completions, **kwargs):
        out = list(fn(prompts, completions, **kwargs))
        if len(out) != len(completions):
            raise SelfloopError(f"grpo reward {name} returned {len(out)} values for {len(completions)} completions; expected one per completion")
        for i, v in enumerate(out):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise SelfloopError(
                    f"grpo reward {name} returned {v!r} for completion {completions[i]!r} of prompt {prompts[i]!r}; rewards must be finite numbers"
                )
        return [float(v) for v in out]

    reward.__name__ = name.split(" ")[0].strip("'")
    return reward


class GRPO(Optimizer):
    name = "grpo"
    Config = GRPOConfig

    def setup(self, ctx):
        check_bootstrap(ctx, self.name)
        evaluators = {e.name: e for e in ctx.strategies.get("evaluate", [])}
        for r in self.config.rewards:
            if r == "roundtrip" and not callable(getattr(ctx.task, "inverse", None)):
                accepted = f"rewards the task can compute: task {ctx.task.name!r} has no inverse(prompt, answer), so no roundtrip"
                raise OptionError("rewards", self.config.rewards, accepted)
            if r == "correct":
                if not getattr(ctx.task, "has_references", True):
                    raise OptionError("rewards", self.config.rewards, f"label-free rewards: task {ctx.task.name!r} has no references for 'correct'")
                if not ctx.run.loop.allow_references_in_training:
                    raise SelfloopError(
                        "optimize.grpo.rewards includes 'correct' (ground truth); it runs only when the run allows references in "
                        "training: set loop.allow_references_in_training=true (every label is counted)"
                    )
            if r not in CHECKS:
                if r not in evaluators:
                    accepted = f"{', '.join(CHECKS)} or configured evaluators ({', '.join(sorted(evaluators)) or 'none'}); got {r!r}"
                    raise OptionError("rewards", self.config.rewards, accepted)
                if getattr(evaluators[r], "uses_references", False):
                    raise OptionError("rewards", self.config.rewards, f"label-free evaluators; {r!r} reads references (use 'correct' with references allowed)")

    # -- rewards -----------------------------------------------------------------------
    def reward_functions(self, ctx, policy) -> list:
        task = ctx.task

        def majority(prompts, completions, row_id, **_):
            # malformed answers do not vote (as unparseable answers in TTRL): a group cannot
            # reward itself for collapsing onto, say, empty answers
            answers = [task.extract_answer(c) for c in completions]
            valid = [task.is_well_formed(p, a) for p, a in zip(prompts, answers)]
            groups = defaultdict(list)
            for key, a, ok in zip(row_id, answers, valid):
                if ok:
                    groups[key].append(a)
            winner = {key: Counter(votes).most_common(1)[0][0] for key, votes in groups.items()}
            return [float(ok and a == winner.get(key)) for key, a, ok in zip(row_id, answers, valid)]

        def well_formed(prompts, completions, **_):
            return [float(task.is_well_formed(p, task.extract_answer(c))) for p, c in zip(prompts, completions)]

        def roundtrip(prompts, completions, **_):
            questions = [task.inverse(p, task.extract_answer(c)) for p, c in zip(prompts, completions)]
            asked = [i for i, q in enumerate(questions) if q is not None]
            out = [0.0] * len(completions)
            if asked:
                longest = max(len(questions[i][0]) for i in asked)
                was_training = policy.model.training
                gens = ctx.generate([questions[i][0] for i in asked], max_new_tokens=longest + 2, model=policy, refine=False)
                policy.model.train(was_training)
                for i, g in zip(asked, gens):
                    out[i] = float(g.answer == questions[i][1])
            return out

        def correct(prompts, completions, reference, **_):
            return [float(r is not None and task.check(c, r)) for c, r in zip(completions, reference)]

        builtin = {"majority": majority, "well_formed": well_formed, "roundtrip": roundtrip, "correct": correct}
        out = []
        for r in self.config.rewards:
            if r in builtin:
                out.append(checked(f"'{r}'", builtin[r]))
            else:
                evaluator = ctx.strategy("evaluate", r)
                out.append(checked(f"'{r}' ({ctx.registry.describe('evaluate', r)})", self.evaluator_reward(ctx, evaluator)))
        return out

    def evaluator_reward(self, ctx, evaluator):
        """A configured evaluator's per-row score of each completion's answer; the row's
        ``completions`` are the group's samples (what agreement-based evaluators compare)."""
        from selfloop.data import make_rows

        task = ctx.task

        def score(prompts, completions, row_id, difficulty, **_):
            groups = defaultdict(list)
            for key, c in zip(row_id, completions):
                groups[key].append(c)
            rows = make_rows(
                dict(id=f"{key}#{i}", prompt=p, completions=groups[key], answer=task.extract_answer(c), difficulty=d, round=ctx.round, source="grpo/sample")
                for i, (p, c, key, d) in enumerate(zip(prompts, completions, row_id, difficulty))
            )
            got = evaluator.score(ctx, rows)
            if not isinstance(got, (list, tuple)):
                raise ContractError(f"{ctx.registry.describe('evaluate', evaluator.name)} score() returned {type(got).__name__}; expected a list of numbers")
            return got

        return score

    # -- training ----------------------------------------------------------------------
    def optimize(self, ctx, data):
        from datasets import Dataset
        from selfloop.errors import StarvedRound
        from selfloop.training import train
        from selfloop_plugins.models.vllm import trl_vllm_args
        from selfloop_plugins.optimize._shared import finish, max_new_tokens, train_bootstrap, trainer_args
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer

        if ctx.round == 0:
            return train_bootstrap(ctx, data, self.name)
        c = self.config
        if "correct" in c.rewards and "reference" not in data.column_names:
            raise SelfloopError("optimize.grpo reward 'correct' got rows without references; set loop.allow_references_in_training=true")
        seen, keep = set(), []
        for i, p in enumerate(data["prompt"]):
            if p not in seen:
                seen.add(p)
                keep.append(i)
        if not keep:
            raise StarvedRound("no prompts to explore (the filters kept no rows)")
        rows = data.select(keep)
        columns = {"prompt": list(rows["prompt"]), "row_id": list(rows["id"]), "difficulty": list(rows["difficulty"])}
        if "correct" in c.rewards:
            columns["reference"] = list(rows["reference"])
        ctx.record(self.name, prompts=len(keep), rewards=list(c.rewards))
        candidate = ctx.model.clone()
        reference_model = {}
        if c.beta > 0:  # TRL loads its KL reference from the policy's name_or_path
            path = ctx.model.save(ctx.checkpoint_dir / "reference")
            reference_model = {"name": candidate.model.config._name_or_path}
            candidate.model.config._name_or_path = str(path)
        args = trainer_args(
            TRLConfig, ctx, ctx.checkpoint_dir / "grpo", candidate.device.type == "cpu",
            max_steps=c.max_steps, per_device_train_batch_size=c.prompts_per_step * c.num_generations, num_generations=c.num_generations,
            max_completion_length=max_new_tokens(ctx, columns["difficulty"]), temperature=c.temperature, beta=c.beta, loss_type=c.loss_type,
            scale_rewards=c.scale_rewards, reward_weights=list(c.reward_weights) or None, learning_rate=c.learning_rate,
            lr_scheduler_type=c.lr_scheduler, warmup_steps=int(c.warmup_ratio * c.max_steps), max_grad_norm=c.max_grad_norm,
            **trl_vllm_args(ctx),  # model=vllm: rollouts through TRL's vLLM integration
        )
        candidate.model.train()
        trainer = GRPOTrainer(model=candidate.model, reward_funcs=self.reward_functions(ctx, candidate), args=args,
                              train_dataset=Dataset.from_dict(columns), processing_class=candidate.tokenizer)
        if reference_model:
            candidate.model.config._name_or_path = reference_model["name"]
        counted = {"tokens": 0}

        def tokens_at(step: int) -> int:  # prompt + completion tokens the trainer saw since the last call
            now = int(trainer.state.num_input_tokens_seen)
            delta, counted["tokens"] = now - counted["tokens"], now
            return delta

        result = train(ctx, trainer, tokens_per_step=tokens_at)
        finish(candidate)
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        candidate.train_metrics = {"train_loss": round(float(result.training_loss), 5)}
        if rewards:
            head = rewards[: max(1, len(rewards) // 10)]
            tail = rewards[-max(1, len(rewards) // 10):]
            candidate.train_metrics.update(reward_first=round(sum(head) / len(head), 5), reward_last=round(sum(tail) / len(tail), 5))
        return candidate


@hookimpl
def selfloop_register_optimizers(register):
    register(GRPO)
