"""The model handle: a causal LM and its tokenizer (transformers), with generate, score,
save and load. Safetensors only; ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# Saved in the model config: parameters to keep frozen whenever the model is loaded
# (e.g. zeroed position embeddings of a NoPE model).
FROZEN_KEY = "selfloop_frozen_parameters"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


class ModelHandle:
    """A causal language model plus tokenizer, on one device."""

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device = "cpu"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        # what the optimizer that made this model wants recorded (e.g. final training loss)
        self.train_metrics: dict[str, float] = {}
        self.apply_frozen()

    # -- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device: str = "auto", trust_remote_code: bool = False) -> ModelHandle:
        """Load a model and tokenizer from a local directory or a hub name (safetensors only)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name_or_path = str(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write model and tokenizer to ``path`` atomically (a temp dir, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def clone(self) -> ModelHandle:
        """An independent copy (train a candidate without touching the incumbent)."""
        return ModelHandle(copy.deepcopy(self.model), self.tokenizer, self.device)

    def apply_frozen(self) -> None:
        names = set(getattr(self.model.config, FROZEN_KEY, None) or [])
        for name, param in self.model.named_parameters():
            if name in names:
                param.requires_grad_(False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- inference ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 64,
        batch_size: int = 1024,
        progress: Any = None,
    ) -> list[list[str]]:
        """``n`` completions per prompt (greedy when ``temperature == 0``), in prompt order.

        Prompts are grouped by token length so batches carry little padding.
        """
        if not prompts:
            return []
        tok = self.tokenizer
        self.model.eval()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded = tok(list(prompts), add_special_tokens=True)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        per_batch = max(1, batch_size // max(1, n))
        out: list[list[str]] = [[] for _ in prompts]
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: generation continues at the right edge
                seq = encoded[i]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            generated = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=pad_id,
                eos_token_id=tok.eos_token_id,
                **sampling,
            )
            texts = tok.batch_decode(generated[:, width:], skip_special_tokens=True)
            for row, i in enumerate(idx):
                out[i] = texts[row * n : (row + 1) * n]
            if progress is not None:
                progress(len(idx))
        return out

    @torch.inference_mode()
    def logprobs(self, prompts: list[str], completions: list[str], batch_size: int = 256) -> list[float]:
        """Mean per-token log-probability of each completion (plus EOS) given its prompt."""
        tok = self.tokenizer
        self.model.eval()
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            rows = []
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
                p_ids = tok(p)["input_ids"]
                c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                rows.append((p_ids + c_ids, len(p_ids)))
            width = max(len(r) for r, _ in rows)
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (seq, _) in enumerate(rows):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1)
            for i, (seq, p_len) in enumerate(rows):
                scores.append(logp[i, p_len - 1 : len(seq) - 1].mean().item())
        return scores
