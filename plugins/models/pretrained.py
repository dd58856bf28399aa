"""Start from an existing causal LM: a local directory or a hub name (``name_or_path``).

Weights load as safetensors only; ``trust_remote_code`` is off unless set.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.strategy import ModelProvider


@dataclass
class PretrainedConfig:
    name_or_path: str = "???"
    trust_remote_code: bool = False


class Pretrained(ModelProvider):
    name = "pretrained"
    Config = PretrainedConfig

    def build(self, ctx):
        from selfloop.model import ModelHandle

        handle = ModelHandle.load(self.config.name_or_path, device=ctx.device, trust_remote_code=self.config.trust_remote_code)
        if handle.tokenizer.pad_token is None:
            handle.tokenizer.pad_token = handle.tokenizer.eos_token
        return handle


@hookimpl
def selfloop_register_models(register):
    register(Pretrained)
