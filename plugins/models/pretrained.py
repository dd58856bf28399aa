"""Start from an existing causal LM: a local directory or a hub name (``name_or_path``).

What ``setup`` checks before any weights load (config.json and the tokenizer only): the path
exists (or names a hub model, resolved from the local cache when offline), its config names a
causal-LM architecture, a local directory holds safetensors weights, and ``chat=always`` has a
chat template to apply. ``build`` then loads the weights in ``dtype`` onto ``device``.

- Weights load as safetensors only; ``trust_remote_code`` is off unless set.
- A tokenizer without a pad token pads with its EOS token (or a new ``<pad>`` token when it has
  no EOS either); the run's warnings and the model config (``selfloop_pad_token``) record it.
- Chat format: when it applies (``chat=always``, or ``auto`` with a tokenizer that has a chat
  template and a task that sets ``chat_format = True``), every prompt becomes a user turn of the
  chat template with the assistant's turn opened. The framing is compiled into the tokenizer's
  post-processor, so generation, log-probabilities and SFT (which all tokenize prompts with
  special tokens and completions without) frame prompts alike, and it is saved with the
  tokenizer, so every later round's model keeps it (checked by a save/reload at build).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import ModelProvider

DTYPES = ("float32", "bfloat16", "float16", "auto")
CHAT_MODES = ("auto", "always", "never")
# saved in the model config (config.json): what the provider did to the tokenizer
PAD_KEY = "selfloop_pad_token"
CHAT_KEY = "selfloop_chat_template"
_PREFIX, _SUFFIX = "<selfloop-chat-prefix>", "<selfloop-chat-suffix>"  # no ":" (it marks type ids)


@dataclass
class PretrainedConfig:
    name_or_path: str = "???"
    # float32 trains safely on any device; bfloat16 halves memory on GPUs; auto: the checkpoint's own
    dtype: str = "float32"
    # "" uses the run's `device`; else cpu, cuda, cuda:1, auto...
    device: str = ""
    trust_remote_code: bool = False
    # auto: chat-format prompts when the tokenizer has a chat template and the task asks (chat_format = True)
    chat: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise OptionError("dtype", self.dtype, ", ".join(DTYPES))
        if self.chat not in CHAT_MODES:
            raise OptionError("chat", self.chat, ", ".join(CHAT_MODES))
        if self.device and not re.fullmatch(r"[a-z]+(:\d+)?", self.device):
            raise OptionError("device", self.device, "empty (the run's device), auto, cpu, cuda, cuda:N or another torch device")


@dataclass
class Checked:
    """What setup found out about the model without loading its weights."""

    source: str  # the local directory (absolute) or the hub name
    architectures: list[str]
    tokenizer: Any
    chat: bool


def resolve_source(name_or_path: str) -> str:
    """An existing local directory (made absolute) or a hub name; a path that does not exist is an error."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OptionError("name_or_path", name_or_path, "a model directory (config.json, *.safetensors, tokenizer files) or a hub model name; this is a file")
        return str(path.resolve())
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local or not name_or_path or name_or_path == "???":
        raise OptionError("name_or_path", name_or_path, "an existing model directory or a hub model name (org/name); no such directory")
    return name_or_path


def causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def check_model(name_or_path: str, trust_remote_code: bool) -> tuple[str, list[str]]:
    """(source, architectures) after the cheap checks: config.json names a causal LM; a local
    directory holds safetensors weights."""
    from transformers import AutoConfig

    source = resolve_source(name_or_path)
    local = Path(source).is_dir()
    if local and not (Path(source) / "config.json").exists():
        raise OptionError("name_or_path", name_or_path, "a directory written by save_pretrained (no config.json here)")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline and not cached, remote code refused, corrupt config...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SelfloopError(f"model {name_or_path!r}: cannot read its config: {first}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    known = causal_lm_classes()
    if architectures and not any(a in known or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise OptionError("name_or_path", name_or_path, f"a causal language model; its config.json names {', '.join(architectures)}")
    if not architectures:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise OptionError("name_or_path", name_or_path, f"a causal language model; model type {config.model_type!r} has none")
    if local:
        folder = Path(source)
        if not list(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
            raise OptionError("name_or_path", name_or_path, "a directory with safetensors weights (selfloop loads no pickled weights)"
                              + (f"; found {', '.join(found)}: convert them with save_pretrained(..., safe_serialization=True)" if found else ""))
    return source, architectures


def load_tokenizer(source: str, name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SelfloopError(f"model {name_or_path!r}: cannot load its tokenizer: {first}") from None


def wants_chat(mode: str, tokenizer: Any, task: Any, name_or_path: str) -> bool:
    """Whether prompts are chat-formatted: ``always``, ``never``, or ``auto`` (a chat template
    and a task that asks for chat format with ``chat_format = True``)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "never":
        return False
    if mode == "always":
        if not has_template:
            raise OptionError("chat", mode, f"auto or never: the tokenizer of {name_or_path} has no chat template")
        return True
    return has_template and bool(getattr(task, "chat_format", False))


def chat_framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after a user message (the assistant's turn
    opened). Raises SelfloopError when the template does not frame every message alike."""
    frames = []
    for probe in ("\x1fselfloop-probe-a\x1f", "\x1fselfloop-probe-b\x1f"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True)
        if text.count(probe) != 1:
            raise SelfloopError(f"the chat template of {tokenizer.name_or_path} does not render a user message verbatim; set the model option chat=never")
        head, _, tail = text.partition(probe)
        frames.append((head, tail))
    if frames[0] != frames[1]:
        raise SelfloopError(f"the chat template of {tokenizer.name_or_path} frames messages differently by content; set the model option chat=never")
    head, tail = frames[0]
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []
    return encode(head), encode(tail)


def install_chat_framing(tokenizer: Any) -> None:
    """Make ``tokenizer(prompt)`` (special tokens on) frame the prompt as a chat user turn."""
    from tokenizers import processors

    if not getattr(tokenizer, "is_fast", False):
        raise SelfloopError(f"chat format needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not; set the model option chat=never")
    head, tail = chat_framing(tokenizer)
    special = []
    for name, ids in ((_PREFIX, head), (_SUFFIX, tail)):
        if ids:
            special.append({"id": name, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)})
    single = " ".join(([_PREFIX] if head else []) + ["$A"] + ([_SUFFIX] if tail else []))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)


def check_chat_survives_reload(tokenizer: Any, trust_remote_code: bool) -> None:
    """The loop reloads every round's model from disk: the framing must come back with it."""
    import tempfile

    from transformers import AutoTokenizer

    probe = "selfloop 123="
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        again = AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)
    if again(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise SelfloopError(f"the chat framing of {tokenizer.name_or_path} is lost when its tokenizer ({type(again).__name__}) is saved and "
                            "reloaded, so later rounds would see unframed prompts; set the model option chat=never")


def add_pad_token(tokenizer: Any, model: Any = None) -> str | None:
    """Give a tokenizer without a pad token one: its EOS token, else a new ``<pad>`` (the model's
    embeddings grow by one). Returns what was done, or None when it had one."""
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        done = f"eos:{tokenizer.eos_token}"
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
        done = "added:<pad>"
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        setattr(model.config, PAD_KEY, done)
    return done


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


class Pretrained(ModelProvider):
    name = "pretrained"
    Config = PretrainedConfig

    def inspect(self, ctx) -> Checked:
        """The cheap checks (config.json and tokenizer, no weights)."""
        c = self.config
        try:
            source, architectures = check_model(c.name_or_path, c.trust_remote_code)
            tokenizer = load_tokenizer(source, c.name_or_path, c.trust_remote_code)
            return Checked(source, architectures, tokenizer, wants_chat(c.chat, tokenizer, ctx.task, c.name_or_path))
        except OptionError as exc:  # build runs outside prepare, which adds the option's path
            raise exc.located(f"model.{self.name}.") from None

    def setup(self, ctx):
        checked = self.inspect(ctx)
        tok = checked.tokenizer
        if tok.pad_token is None:
            using = f"its EOS token {tok.eos_token!r}" if tok.eos_token is not None else "a new <pad> token (embeddings grow by one)"
            ctx.warn(self.name, f"the tokenizer of {self.config.name_or_path} has no pad token; padding with {using} "
                                "(attention masks and -100 labels keep padding out of generation and the loss)")
        if checked.chat:
            install_chat_framing(tok)
            check_chat_survives_reload(tok, self.config.trust_remote_code)

    def build(self, ctx):
        from transformers import AutoModelForCausalLM

        from selfloop.model import ModelHandle

        c = self.config
        checked = self.inspect(ctx)
        tok = checked.tokenizer
        model = AutoModelForCausalLM.from_pretrained(checked.source, dtype=torch_dtype(c.dtype), use_safetensors=True, trust_remote_code=c.trust_remote_code)
        padded = add_pad_token(tok, model)
        if padded:
            ctx.log.info("%s: the tokenizer had no pad token; padding with %s", self.name, padded)
        if checked.chat:
            install_chat_framing(tok)
            check_chat_survives_reload(tok, c.trust_remote_code)
        setattr(model.config, CHAT_KEY, checked.chat)
        return ModelHandle(model, tok, c.device or ctx.device)

    def load(self, ctx, path):
        """A saved round's model on this provider's device (the loop reloads every round's
        model through its provider)."""
        from selfloop.model import ModelHandle

        return ModelHandle.load(path, device=self.config.device or ctx.device, trust_remote_code=self.config.trust_remote_code)


@hookimpl
def selfloop_register_models(register):
    register(Pretrained)
