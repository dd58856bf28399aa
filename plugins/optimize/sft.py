"""Self-supervised fine-tuning with TRL's SFTTrainer on the kept pseudo-labels, plus a
replay share of earlier rounds' data against forgetting.

Where a round starts (``init``): the incumbent (default; Lee et al. 2025, SPIN), round 0's
model (``bootstrap``; STaR and ReST-EM restart every iteration from the same base), or the
model provider's model before any training (``initial``: the pretrained checkpoint itself).

Each optimizer step sees ``batch_size`` rows drawn by share: ``1 - replay_fraction`` from
this round's rows, the rest from earlier promoted rounds (bootstrap and earlier
self-labels, split by ``replay_bootstrap_share``). Rows are tokenized once here (prompt tokens masked
out of the loss) and the mix is an index selection over them, so a round costs no more
preprocessing than its unique rows.

LoRA (``lora_rank > 0``, through ``peft``) trains low-rank adapters on the chosen layers and
freezes the rest; the candidate is saved merged into full weights (default) or as adapters
over a base model on disk, which ``ModelHandle.load`` reloads. A candidate whose starting
model already carries adapters continues training them.

Under ``accelerate launch`` (data parallelism) every process builds the same rows from the
same seeds, and each optimizer step splits its ``batch_size`` rows across the processes, so
a step means the same in one process or many.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Optimizer

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
INITS = ("incumbent", "bootstrap", "initial")
LORA_SAVES = ("merged", "adapter")


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
    # where each round's training starts: incumbent | bootstrap (round 0's model) | initial (the provider's)
    init: str = "incumbent"
    # LoRA adapters through peft; rank 0 trains every weight
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # layer names (e.g. [q_proj, v_proj], or [all-linear]); null: peft's default for the architecture
    lora_target_modules: list[str] | None = None
    # merged: full weights; adapter: adapters only, over a base model on disk
    lora_save: str = "merged"

    def __post_init__(self):
        targets = self.lora_target_modules
        for option, value, ok, accepted in (
            ("max_steps", self.max_steps, self.max_steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0"),
            ("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio <= 1, "a number in [0, 1]"),
            ("replay_fraction", self.replay_fraction, 0 <= self.replay_fraction <= 1, "a number in [0, 1]"),
            ("replay_bootstrap_share", self.replay_bootstrap_share, 0 <= self.replay_bootstrap_share <= 1, "a number in [0, 1]"),
            ("lr_scheduler", self.lr_scheduler, self.lr_scheduler in LR_SCHEDULERS, ", ".join(LR_SCHEDULERS)),
            ("init", self.init, self.init in INITS, ", ".join(INITS)),
            ("lora_rank", self.lora_rank, self.lora_rank >= 0, "an integer >= 0 (0: no LoRA, every weight trains)"),
            ("lora_alpha", self.lora_alpha, self.lora_alpha > 0, "a number > 0"),
            ("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "a number in [0, 1)"),
            ("lora_target_modules", targets, targets is None or (len(targets) > 0 and all(isinstance(t, str) and t for t in targets)),
             "null (peft's default for the architecture) or a non-empty list of layer names"),
            ("lora_save", self.lora_save, self.lora_save in LORA_SAVES, ", ".join(LORA_SAVES)),
        ):
            if not ok:
                raise OptionError(option, value, accepted)


def tokenize_rows(tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids = prompt + answer + EOS; labels mask the prompt with -100."""
    p_ids = tokenizer(prompts)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [p + a + [eos] for p, a in zip(p_ids, a_ids)]
    labels = [[-100] * len(p) + a + [eos] for p, a in zip(p_ids, a_ids)]
    return ids, labels


# -- LoRA ------------------------------------------------------------------------------------
def layer_names(model) -> list[str]:
    """Names (last component) of the layers LoRA can adapt: linear, embedding and conv layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and isinstance(module, kinds)})


def lora_targets(model, targets: list[str] | None, option: str) -> list[str] | str:
    """The target modules for peft, checked against the model: every name must match a layer."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS,
    )

    present = layer_names(model)
    accepted = f"names of this model's layers: {', '.join(present)} (or all-linear)"
    if targets is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in DEFAULTS:
            raise OptionError(option, None, f"a list: peft has no default LoRA targets for model type {model_type!r}; {accepted}")
        return list(DEFAULTS[model_type])
    targets = list(targets)
    if targets == ["all-linear"]:
        return "all-linear"
    modules = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
    if missing:
        raise OptionError(option, targets, f"{accepted}; not found: {', '.join(missing)}")
    return targets


def split_adapters(model) -> tuple[Any, Any, dict[str, Any]] | None:
    """A model loaded from an adapter directory (transformers' PEFT integration) as (its base
    model with the adapter layers removed, the adapter's LoraConfig, the adapter weights);
    None for a plain model. The model is modified in place: pass a copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs = getattr(model, "peft_config", None)
    if not getattr(model, "_hf_peft_config_loaded", False) or not configs:
        return None
    if len(configs) != 1:
        raise SelfloopError(f"sft continues a model's adapters one adapter at a time; the starting model carries {sorted(configs)}")
    ((adapter, config),) = configs.items()
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if f".{adapter}." in name and "lora_" in name}
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    model._hf_peft_config_loaded = False
    del model.peft_config
    config = copy.deepcopy(config)
    config.inference_mode = False
    return model, config, weights


def with_adapters(model, config, weights: dict[str, Any] | None = None):
    """A PeftModel over ``model`` (fresh adapters, or ``weights`` from split_adapters)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if weights:
        result = peft_model.load_state_dict({f"base_model.model.{k}": v for k, v in weights.items()}, strict=False)
        unloaded = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or unloaded:
            raise RuntimeError(f"the adapter weights do not fit the rebuilt adapters: {(result.unexpected_keys or unloaded)[:3]}")
    return peft_model


def base_on_disk(source: str | None) -> str | None:
    """Where a base model can be reloaded from: an absolute local model directory or a hub name."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        return str(path.resolve()) if (path / "config.json").exists() else None
    return None if path.is_absolute() or source.startswith(".") else source


class SFT(Optimizer):
    name = "sft"
    Config = SFTConfig

    def setup(self, ctx):
        import importlib.util

        if self.config.lora_rank and importlib.util.find_spec("peft") is None:
            raise OptionError("lora_rank", self.config.lora_rank, "0: LoRA needs the peft package (pip install peft)")

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

    def training_rows(self, ctx, pools, tokenizer):
        """The round's ``max_steps * batch_size`` rows (input_ids, labels), drawn from the pools
        by share with ``ctx.rng`` and shuffled; and each row's length in tokens."""
        from datasets import Dataset

        c = self.config
        ids, labels, offsets = [], [], []
        for _, ds in pools:
            offsets.append(len(ids))
            i, l = tokenize_rows(tokenizer, list(ds["prompt"]), list(ds["answer"]))
            ids += i
            labels += l
        total = c.max_steps * c.batch_size
        order = []
        for (share, ds), off in zip(pools, offsets):
            order += [off + ctx.rng.randrange(len(ds)) for _ in range(round(total * share))]
        ctx.rng.shuffle(order)
        rows = Dataset.from_dict({"input_ids": ids, "labels": labels}).select(order)
        return rows, [len(ids[i]) for i in order]

    def starting_model(self, ctx):
        """An independent copy of the model this round trains from (see ``init``)."""
        init = self.config.init
        if ctx.round == 0 or init == "incumbent":
            handle, origin = ctx.model.clone(), "incumbent"
        elif init == "bootstrap":
            handle, origin = ctx.load_model("bootstrap"), "round 0's model"
        else:
            handle, origin = self.initial_model(ctx), "the model provider's untrained model"
        ctx.record(self.name, init=init, started_from=origin)
        return handle

    @staticmethod
    def initial_model(ctx):
        """The model provider's model as round 0 got it, rebuilt with round 0's seed (the
        global random states of this stage are left as they were)."""
        import numpy as np
        import torch

        from selfloop.context import seed_everything, stage_seed

        (provider,) = ctx.strategies["model"]
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                seed_everything(stage_seed(ctx.run.seed, 0, "model"))
                return provider.build(ctx)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def prepare_lora(self, ctx, model):
        """The model to train: as it is (full fine-tuning; a model carrying adapters has them
        merged first), or a PeftModel whose adapters are fresh or the starting model's, continued."""
        c = self.config
        if not c.lora_rank and not getattr(model, "_hf_peft_config_loaded", False):
            return model  # full fine-tuning of a plain model: peft is not needed (nor imported)
        from peft import LoraConfig

        option = f"optimize.{self.name}.lora_target_modules"
        split = split_adapters(model)
        if split is not None:
            base, config, weights = split
            if not c.lora_rank:  # full fine-tuning of a model that carries adapters: merge them first
                return with_adapters(base, config, weights).merge_and_unload()
            if config.r != c.lora_rank:
                ctx.warn(self.name, f"the starting model carries rank-{config.r} adapters; continuing them (lora_rank={c.lora_rank} applies to fresh adapters)")
            return with_adapters(base, config, weights)
        from transformers.pytorch_utils import Conv1D

        config = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, bias="none", task_type="CAUSAL_LM",
                            target_modules=lora_targets(model, c.lora_target_modules, option),
                            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))  # GPT-2 stores weights transposed
        return with_adapters(model, config)

    def finish_lora(self, ctx, model):
        """The trained model as it will be saved: merged full weights, or the PeftModel whose
        adapters point at their base on disk."""
        peft_model_class = getattr(sys.modules.get("peft"), "PeftModel", None)  # peft is imported only if LoRA was used
        if peft_model_class is None or not isinstance(model, peft_model_class):
            return model
        if self.config.lora_save == "merged":
            return model.merge_and_unload()
        config = model.peft_config["default"]
        base = base_on_disk(config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None))
        if base is None:
            raise OptionError(f"optimize.{self.name}.lora_save", "adapter",
                              "merged: this round's base model was never saved to disk, so its adapters could not be reloaded "
                              f"(e.g. model=tiny in round 0: train the bootstrap fully with +loop.bootstrap.optimize.{self.name}.lora_rank=0, "
                              "and later rounds' adapters sit on round 0's saved model)")
        config.base_model_name_or_path = base
        return model

    def optimize(self, ctx, data):
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer

        from selfloop.errors import StarvedRound
        from selfloop.model import ModelHandle
        from selfloop.training import train

        c = self.config
        pools = self.mixture(ctx, data)
        if not pools:
            raise StarvedRound("no rows to train on (none kept this round and no earlier rounds to replay)")
        start = self.starting_model(ctx)
        tok = start.tokenizer
        rows, lengths = self.training_rows(ctx, pools, tok)

        def tokens_at(step: int) -> int:
            return sum(lengths[(step - 1) * c.batch_size : step * c.batch_size])

        model = self.prepare_lora(ctx, start.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ctx.record(self.name, trainable_parameters=trainable, **({"lora_rank": c.lora_rank, "lora_save": c.lora_save} if c.lora_rank else {}))
        on_cpu = start.device.type == "cpu"
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
        processes = args.world_size
        if processes > 1:  # data parallelism: a step's batch_size rows are split across the processes
            if c.batch_size % processes:
                raise OptionError(f"optimize.{self.name}.batch_size", c.batch_size, f"a multiple of the {processes} training processes")
            args.per_device_train_batch_size = c.batch_size // processes
            ctx.record(self.name, processes=processes)
        model.train()
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
        result = train(ctx, trainer, tokens_per_step=tokens_at)
        model = self.finish_lora(ctx, model)
        model.eval()
        candidate = ModelHandle(model, tok, start.device)
        candidate.train_metrics = {"train_loss": round(float(result.training_loss), 5)}
        return candidate


@hookimpl
def selfloop_register_optimizers(register):
    register(SFT)
