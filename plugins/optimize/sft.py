"""Self-supervised fine-tuning with TRL's SFTTrainer on the kept pseudo-labels, plus a
replay share of earlier rounds' data against forgetting.

Each optimizer step sees ``batch_size`` rows drawn by share: ``1 - replay_fraction`` from
this round's rows, the rest from earlier promoted rounds (bootstrap and earlier
self-labels, split by ``replay_bootstrap_share``). Rows are tokenized once here (prompt tokens masked
out of the loss) and the mix is an index selection over them, so a round costs no more
preprocessing than its unique rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.strategy import Optimizer


@dataclass
class SFTConfig:
    max_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # share of every batch drawn from earlier rounds' training data
    replay_fraction: float = 0.25
    # share of the replay drawn from the bootstrap; the rest comes from earlier self-labels,
    # which the default acquirer relabels each round instead (see task_sampler)
    replay_bootstrap_share: float = 1.0

    def __post_init__(self):
        from selfloop.errors import OptionError

        for option, value, ok, accepted in (
            ("max_steps", self.max_steps, self.max_steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0"),
            ("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio <= 1, "a number in [0, 1]"),
            ("replay_fraction", self.replay_fraction, 0 <= self.replay_fraction <= 1, "a number in [0, 1]"),
            ("replay_bootstrap_share", self.replay_bootstrap_share, 0 <= self.replay_bootstrap_share <= 1, "a number in [0, 1]"),
            ("lr_scheduler", self.lr_scheduler, self.lr_scheduler in LR_SCHEDULERS, ", ".join(LR_SCHEDULERS)),
        ):
            if not ok:
                raise OptionError(option, value, accepted)


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")

def tokenize_rows(tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids = prompt + answer + EOS; labels mask the prompt with -100."""
    p_ids = tokenizer(prompts)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [p + a + [eos] for p, a in zip(p_ids, a_ids)]
    labels = [[-100] * len(p) + a + [eos] for p, a in zip(p_ids, a_ids)]
    return ids, labels


class SFT(Optimizer):
    name = "sft"
    Config = SFTConfig

    def mixture(self, ctx, data) -> list[tuple[float, object]]:
        """(share of each batch, dataset) pools for this round."""
        c = self.config
        history = ctx.training_history()
        sources = history["source"]
        boot = history.select([i for i, s in enumerate(sources) if s == "bootstrap"])
        earlier = history.select([i for i, s in enumerate(sources) if s != "bootstrap"])
        replay = [(w, ds) for w, ds in ((c.replay_bootstrap_share, boot), (1 - c.replay_bootstrap_share, earlier)) if len(ds) and w > 0]
        weight = sum(w for w, _ in replay)
        new_share = 0.0 if not len(data) else (1.0 - c.replay_fraction if replay else 1.0)
        pools = [(new_share, data)] + [((1.0 - new_share) * w / weight, ds) for w, ds in replay]
        return [(share, ds) for share, ds in pools if share > 0 and len(ds)]

    def optimize(self, ctx, data):
        from datasets import Dataset
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer

        from selfloop.errors import StarvedRound
        from selfloop.training import train

        c = self.config
        candidate = ctx.model.clone()
        pools = self.mixture(ctx, data)
        if not pools:
            raise StarvedRound("no rows to train on (none kept this round and no earlier rounds to replay)")
        tok = candidate.tokenizer
        ids, labels, offsets = [], [], []
        for _, ds in pools:
            offsets.append(len(ids))
            i, l = tokenize_rows(tok, list(ds["prompt"]), list(ds["answer"]))
            ids += i
            labels += l
        total = c.max_steps * c.batch_size
        order = []
        for (share, ds), off in zip(pools, offsets):
            order += [off + ctx.rng.randrange(len(ds)) for _ in range(round(total * share))]
        ctx.rng.shuffle(order)
        rows = Dataset.from_dict({"input_ids": ids, "labels": labels}).select(order)
        lengths = [len(ids[i]) for i in order]

        def tokens_at(step: int) -> int:
            return sum(lengths[(step - 1) * c.batch_size : step * c.batch_size])

        on_cpu = candidate.device.type == "cpu"
        fields = {f.name for f in dataclasses.fields(TRLConfig)}
        no_checkpointing = {"activation_checkpointing": False} if "activation_checkpointing" in fields else {"gradient_checkpointing": False}
        args = TRLConfig(
            output_dir=str(ctx.checkpoint_dir),
            max_steps=c.max_steps,
            per_device_train_batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            lr_scheduler_type=c.lr_scheduler,
            warmup_steps=int(c.warmup_ratio * c.max_steps),
            weight_decay=c.weight_decay,
            max_grad_norm=c.max_grad_norm,
            save_strategy="no",  # selfloop.training checkpoints by time and resumes inside the stage
            report_to=[],
            seed=ctx.rng.randrange(2**31),
            use_cpu=on_cpu,
            bf16=False,
            fp16=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            shuffle_dataset=False,
            dataloader_num_workers=0,
            **no_checkpointing,
        )
        candidate.model.train()
        trainer = SFTTrainer(model=candidate.model, args=args, train_dataset=rows, processing_class=tok)
        result = train(ctx, trainer, tokens_per_step=tokens_at)
        candidate.model.eval()
        candidate.train_metrics = {"train_loss": round(float(result.training_loss), 5)}
        return candidate


@hookimpl
def selfloop_register_optimizers(register):
    register(SFT)
