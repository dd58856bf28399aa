"""Abacus embeddings (McLeish et al. 2024, "Transformers Can Do Arithmetic with the Right
Embeddings"): a GPT-2 whose position ids are each digit's index within its number.

Every digit token gets position ``1 + (digits directly before it)``, every other token 0, so
the k-th digit of each operand and of the answer share one learnt embedding and the model
aligns them by content rather than by counting. In training the position ids of each
sequence are shifted by a random offset in ``[0, abacus_max_offset]``, so indices longer
numbers need are learnt from short ones: that is what lets the model extrapolate to numbers
longer than it was trained on. Separators shift with the digits (McLeish et al. shift digits
only): "=" then always sits one index below the answer's first digit. On reversed addition
(1-3 digits, offsets up to 5) the tiny model's training loss fell below 0.002 by step 2500
this way, and stayed near 0.1 through 5000 steps with only the digits shifted (docs/study.md).

The positions are computed inside the model from the token ids (a forward pre-hook on the
transformer), so trainers, scoring and ``generate`` need nothing special; during cached
generation ``prepare_inputs_for_generation`` computes them from the whole sequence so far.
Registered with the transformers Auto classes (model type ``selfloop_abacus_gpt2``) on import,
which the ``tiny`` provider does when it builds or loads a model, so a saved model reloads
through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

MODEL_TYPE = "selfloop_abacus_gpt2"


class AbacusGPT2Config(GPT2Config):
    model_type = MODEL_TYPE

    def __init__(self, abacus_digit_ids: list[int] | None = None, abacus_max_offset: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.abacus_digit_ids = list(abacus_digit_ids or [])
        self.abacus_max_offset = abacus_max_offset


def abacus_positions(input_ids: torch.Tensor, digit_ids: torch.Tensor, offset: torch.Tensor | int = 0, limit: int | None = None) -> torch.Tensor:
    """Index of each digit within its run of digits (1-based), 0 for other tokens, all plus
    ``offset`` (one per row). Clipped to ``limit - 1`` (the embedding table's size)."""
    is_digit = torch.isin(input_ids, digit_ids)
    count = is_digit.long().cumsum(-1)
    # the running digit count at the last non-digit token: a digit's index is the count since
    count_at_break = torch.where(is_digit, torch.zeros_like(count), count).cummax(-1).values
    positions = torch.where(is_digit, count - count_at_break, torch.zeros_like(count))
    # separators shift too: the token before a number (e.g. "=" before the answer) then always
    # sits one index below its first digit, the relation every later digit uses
    positions = positions + (offset[:, None] if torch.is_tensor(offset) else offset)
    return positions.clamp(max=limit - 1) if limit is not None else positions


def _set_positions(transformer, args, kwargs):
    """Forward pre-hook of the transformer: replace position ids by Abacus indices."""
    input_ids = args[0] if args else kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("an Abacus model computes its position ids from input_ids; inputs_embeds alone are not supported")
    cache = kwargs.get("cache")
    if cache is not None and cache.get_seq_length() > 0:
        # a continuation: only prepare_inputs_for_generation saw the whole sequence
        if kwargs.get("position_ids") is None:
            raise ValueError("an Abacus model continuing from a cache needs position_ids (use generate(), which computes them)")
        return None
    config = transformer.config
    offset: torch.Tensor | int = 0
    if transformer.training and config.abacus_max_offset > 0:
        offset = torch.randint(0, config.abacus_max_offset + 1, (input_ids.shape[0],), device=input_ids.device)
    kwargs["position_ids"] = _positions(config, input_ids, offset)
    return args, kwargs


def _positions(config: AbacusGPT2Config, input_ids: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    digit_ids = torch.tensor(config.abacus_digit_ids, device=input_ids.device)
    return abacus_positions(input_ids, digit_ids, offset, config.n_positions)


class AbacusGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = AbacusGPT2Config

    def __init__(self, config: AbacusGPT2Config):
        super().__init__(config)
        if not config.abacus_digit_ids:
            raise ValueError("an Abacus model needs abacus_digit_ids: the token ids of the digits")
        self.transformer.register_forward_pre_hook(_set_positions, with_kwargs=True)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        step_ids = inputs.get("input_ids")
        if step_ids is not None:
            inputs["position_ids"] = _positions(self.config, input_ids)[:, -step_ids.shape[1] :]
        return inputs


AutoConfig.register(MODEL_TYPE, AbacusGPT2Config, exist_ok=True)
AutoModelForCausalLM.register(AbacusGPT2Config, AbacusGPT2LMHeadModel, exist_ok=True)
