"""A tiny GPT-2-style model built from a config, with a character tokenizer made locally
from the task's alphabet: nothing is downloaded.

By default it has no positional encoding (NoPE: position embeddings zeroed and frozen),
which Lee et al. 2025 found generalizes to longer inputs than learned or rotary ones.
``positional: abacus`` gives each digit the embedding of its index within its number instead
(McLeish et al. 2024; ``abacus.py``), for arithmetic on numbers longer than the training ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfloop import hookimpl
from selfloop.errors import SelfloopError
from selfloop.strategy import ModelProvider

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
POSITIONAL = ("none", "learned", "abacus")
DIGITS = "0123456789"


@dataclass
class TinyConfig:
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    positional: str = "none"  # none (NoPE) | learned | abacus
    # abacus only: in training each sequence's position ids shift by a random offset up to
    # this, so the indices of longer numbers are learnt from short ones
    abacus_max_offset: int = 5
    activation: str = "gelu"

    def __post_init__(self):
        from selfloop.errors import OptionError

        if self.positional not in POSITIONAL:
            raise OptionError("positional", self.positional, "none (NoPE), learned or abacus (digit index within its number)")
        if self.abacus_max_offset < 0:
            raise OptionError("abacus_max_offset", self.abacus_max_offset, "an integer >= 0")
        if self.n_embd % self.n_head:
            raise OptionError("n_embd", self.n_embd, f"a multiple of n_head={self.n_head}")
        for option in ("n_layer", "n_embd", "n_head", "n_positions"):
            if getattr(self, option) < 1:
                raise OptionError(option, getattr(self, option), "an integer >= 1")


def char_tokenizer(alphabet: str):
    """A fast tokenizer with one token per character of ``alphabet``; prepends ``<bos>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


class Tiny(ModelProvider):
    name = "tiny"
    Config = TinyConfig

    def setup(self, ctx):
        if not ctx.task.alphabet:
            raise SelfloopError(f"model 'tiny' builds a character tokenizer from the task's alphabet, and task {ctx.task.name!r} declares none; use model=pretrained")
        c = self.config
        if c.positional == "abacus":
            if not set(DIGITS) & set(ctx.task.alphabet):
                raise SelfloopError(f"model.tiny.positional=abacus indexes the digits of numbers, and task {ctx.task.name!r} has no digits in its alphabet; use none or learned")
            longest = max(ctx.task.levels, default=0) + 1  # a sum can be one digit longer
            if c.n_positions <= c.abacus_max_offset + longest:
                raise SelfloopError(
                    f"model.tiny.n_positions={c.n_positions} is too small for positional=abacus: digit indices reach "
                    f"abacus_max_offset ({c.abacus_max_offset}) + {longest} digits; raise n_positions or lower abacus_max_offset"
                )

    def build(self, ctx):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from selfloop.model import FROZEN_KEY, ModelHandle
        from selfloop_plugins.models.abacus import AbacusGPT2Config, AbacusGPT2LMHeadModel

        c = self.config
        alphabet = ctx.task.alphabet
        tokenizer = char_tokenizer(alphabet)
        extra = {}
        if c.positional == "abacus":
            extra = dict(abacus_digit_ids=tokenizer.convert_tokens_to_ids([d for d in DIGITS if d in alphabet]), abacus_max_offset=c.abacus_max_offset)
        config = (AbacusGPT2Config if extra else GPT2Config)(
            vocab_size=len(tokenizer),
            n_positions=c.n_positions,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            activation_function=c.activation,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
        model = AbacusGPT2LMHeadModel(config) if extra else GPT2LMHeadModel(config)
        if c.positional == "none":
            with torch.no_grad():
                model.transformer.wpe.weight.zero_()
            setattr(model.config, FROZEN_KEY, ["transformer.wpe.weight"])
        return ModelHandle(model, tokenizer, ctx.device)

    def load(self, ctx, path):
        import selfloop_plugins.models.abacus  # noqa: F401  registers its model type with transformers

        return super().load(ctx, path)


@hookimpl
def selfloop_register_models(register):
    register(Tiny)
