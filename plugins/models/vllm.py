"""Generation through vLLM (optional; needs a CUDA GPU and ``pip install vllm``, a version
TRL supports: 0.22-0.31 for TRL 1.16).

``model=vllm`` loads the model like ``pretrained`` (same options: the transformers copy is
the one the optimizers train) and generates through vLLM, via TRL's own engine wrapper
(``trl.generation.vllm_generation.VLLMGeneration``, colocated in the run's process): it
builds the engine from the model's directory, pushes the trained weights into it when a new
round's model arrives, and sleeps between calls (``enable_sleep_mode``) so training gets the
GPU memory back. GRPO reads :func:`trl_vllm_args` to turn on TRL's vLLM integration for its
rollouts with the same settings.

    pip install vllm
    selfloop run model=vllm model.vllm.name_or_path=Qwen/Qwen2.5-0.5B-Instruct model.vllm.dtype=bfloat16 \\
        model.vllm.gpu_memory_utilization=0.3 optimize=grpo

Generation matches ``ModelHandle.generate``: ``n`` samples per prompt at ``temperature``
(greedy at 0), no top-k/top-p truncation, stops at EOS; completion log-probabilities are
vLLM's processed ones (after temperature scaling; equal to the raw ones at temperature 1).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop_plugins.models.pretrained import Pretrained, PretrainedConfig

GRPO_MODES = ("colocate", "server")
MISSING = ("model 'vllm' needs the vllm package, which is not installed: `pip install vllm` (a version TRL supports, "
           "on a machine with a CUDA GPU), or use model=pretrained")


@dataclass
class VLLMConfig(PretrainedConfig):
    dtype: str = "bfloat16"
    # share of the GPU's memory the acquisition engine may take (weights + KV cache); training needs the rest
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    # prompt + completion tokens; null: the model config's
    max_model_len: int | None = None
    # offload the engine between generation calls, so training gets the GPU memory back
    enable_sleep_mode: bool = True
    # how GRPO's rollouts use vLLM (TRL's vllm_mode): colocate (in the training process) or server (`trl vllm-serve`)
    grpo_mode: str = "colocate"
    server_base_url: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.gpu_memory_utilization <= 1:
            raise OptionError("gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise OptionError("tensor_parallel_size", self.tensor_parallel_size, "an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise OptionError("max_model_len", self.max_model_len, "null or an integer >= 1")
        if self.grpo_mode not in GRPO_MODES:
            raise OptionError("grpo_mode", self.grpo_mode, ", ".join(GRPO_MODES))
        if self.grpo_mode == "server" and not self.server_base_url:
            raise OptionError("server_base_url", self.server_base_url, "the URL of a running `trl vllm-serve` (grpo_mode=server)")


def engine_kwargs(config: VLLMConfig) -> dict[str, Any]:
    """Arguments of TRL's ``VLLMGeneration`` for the acquisition engine (colocated)."""
    return {
        "mode": "colocate",
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_length": config.max_model_len,
        "enable_sleep_mode": config.enable_sleep_mode,
        "trust_remote_code": config.trust_remote_code,
        "logprobs": 0,  # the sampled token's log-probability, for completion_logprobs
    }


def sampling(temperature: float, max_new_tokens: int) -> dict[str, Any]:
    """The engine's sampling settings for one call, as ModelHandle.generate samples: the full
    distribution at ``temperature`` (greedy at 0), no truncation or penalties."""
    return {"temperature": float(temperature), "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "max_completion_length": int(max_new_tokens)}


def trl_vllm_args(ctx: Any) -> dict[str, Any]:
    """GRPOConfig fields that make TRL's GRPOTrainer roll out with vLLM, with this run's
    settings; empty unless the run's model is ``vllm``. For optimizers: ``GRPOConfig(...,
    **trl_vllm_args(ctx))``."""
    provider = next(iter(ctx.strategies.get("model", [])), None)
    if not isinstance(provider, VLLM):
        return {}
    c = provider.config
    args = {"use_vllm": True, "vllm_mode": c.grpo_mode, "vllm_enable_sleep_mode": c.enable_sleep_mode}
    if c.grpo_mode == "server":
        args["vllm_server_base_url"] = c.server_base_url
    else:
        args.update(vllm_gpu_memory_utilization=c.gpu_memory_utilization, vllm_tensor_parallel_size=c.tensor_parallel_size,
                    vllm_max_model_length=c.max_model_len)
    return args


def make_engine(model: Any, tokenizer: Any, kwargs: dict[str, Any]) -> Any:
    """TRL's vLLM engine wrapper over ``model`` (its weights are read from ``model.name_or_path``)."""
    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(model=model, accelerator=Accelerator(), processing_class=tokenizer, **kwargs)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# one engine per process and configuration: later rounds' models push their weights into it
_ENGINES: dict[tuple, Any] = {}


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise SelfloopError(MISSING)


@functools.cache
def handle_class():
    """VLLMHandle, defined on first use (ModelHandle imports torch)."""
    from selfloop.model import ModelHandle

    class VLLMHandle(ModelHandle):
        """A ModelHandle whose ``generate`` runs on a vLLM engine; training, log-probs and
        saving use the transformers model as usual."""

        def __init__(self, model, tokenizer, device, kwargs: dict[str, Any]):
            super().__init__(model, tokenizer, device)
            self.engine_kwargs = dict(kwargs)

        def engine(self) -> Any:
            key = tuple(sorted((k, repr(v)) for k, v in self.engine_kwargs.items()))
            engine = _ENGINES.get(key)
            if engine is None:
                _require_vllm()
                engine = _ENGINES[key] = make_engine(self.model, self.tokenizer, self.engine_kwargs)
            elif engine.model is not self.model:  # a new round's model: push its weights
                engine.model = self.model
                engine.sync_weights()
            return engine

        def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64, batch_size=1024, progress=None, return_logprobs=False):
            if not prompts:
                return ([], []) if return_logprobs else []
            engine = self.engine()
            for name, value in sampling(temperature, max_new_tokens).items():
                setattr(engine, name, value)
            encoded = self.tokenizer(list(prompts))["input_ids"]  # chat framing included, as in ModelHandle
            _, completions, logprobs, _ = engine.generate(prompts=[ids for ids in encoded for _ in range(n)], images=None, num_generations=n)
            texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
            means = [_mean([lp[0] for lp in seq if lp and lp[0] is not None]) for seq in (logprobs or [[]] * len(completions))]
            out = [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
            tokens = sum(len(c) for c in completions)
            ModelHandle.generated_sequences += len(completions)
            ModelHandle.generated_tokens += tokens
            if ModelHandle.on_generated is not None:
                ModelHandle.on_generated(len(completions), tokens, self.num_parameters)
            if progress is not None:
                progress(len(prompts))
            return (out, [means[i * n : (i + 1) * n] for i in range(len(prompts))]) if return_logprobs else out

    return VLLMHandle


class VLLM(Pretrained):
    name = "vllm"
    Config = VLLMConfig

    def setup(self, ctx):
        _require_vllm()
        super().setup(ctx)

    def wrap(self, handle):
        """The handle, generating through vLLM."""
        return handle_class()(handle.model, handle.tokenizer, handle.device, engine_kwargs(self.config))

    def build(self, ctx):
        return self.wrap(super().build(ctx))

    def load(self, ctx, path):
        """A saved round's model, generating through the same engine (for the loop's reloads)."""
        return self.wrap(super().load(ctx, path))


@hookimpl
def selfloop_register_models(register):
    register(VLLM)
