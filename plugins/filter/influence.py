"""Drop the rows estimated to hurt a held-out, label-free objective the most.

A row's influence is how much one training step on it would lower the loss of a held-out
objective, estimated to first order by the similarity of their gradients at the current
model: TracIn (Pruthi et al. 2020) with a single checkpoint, the dot product of the row's loss
gradient with the objective's; LESS (Xia et al. 2024), the average cosine similarity with the
objective's per-example gradients, which ignores gradient norms. A row whose gradient points
against the held-out data, e.g. a wrong self-label, scores lowest. TracIn's dot product is the
default: on reversal rows with planted wrong labels it put them in the most harmful quarter
39% of the time (chance: 25%), while the cosine, which discards the large gradients of wrong
labels, did no better than chance (docs/filters.md).

- Per-example gradients of the SFT loss on the row's answer (prompt tokens masked, EOS
  included, as ``sft`` trains), batched with ``torch.func`` (``vmap(grad(...))``); one backward
  per row where vmap cannot run the model.
- Projected to ``projection_dim`` numbers with a fixed random CountSketch (each parameter
  coordinate added with a random sign to one of the dimensions; Charikar et al. 2002), which
  preserves inner products in expectation and costs O(parameters) per row, so memory never
  holds more than one batch of full gradients.
- The held-out objective (``target``): the loss on rows trained on in earlier promoted rounds
  (``ctx.training_history()``: the bootstrap's counted labels and the kept self-labels), or on
  this round's unanimously agreed rows (leave-one-out for the row itself); ``auto`` takes the
  history when there is one.

Cost per row: one forward and backward pass of the model (batched), plus O(parameters) for the
projection; the objective costs the same for ``n_target`` rows. Restrict ``parameters`` (a
regex over parameter names, e.g. ``lm_head|h\\.1\\.``) for large models: per-example gradient
memory is ``batch_size x parameters`` floats.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Filter

TARGETS = ("auto", "history", "agreed")
SIMILARITIES = ("cosine", "dot")
PROJECTION_SEED = 20240521  # fixed: scores compare across rounds and resumes


@dataclass
class InfluenceConfig:
    # drop this share of the rows, those with the lowest (most harmful) influence
    drop_share: float = 0.1
    # also drop every row scoring below this (e.g. 0.0: every row estimated to hurt); None: off
    min_score: Optional[float] = None
    # the held-out objective: auto | history (rows trained on before) | agreed (this round's unanimous rows)
    target: str = "auto"
    # rows of the objective used (sampled with the stage's seed)
    n_target: int = 256
    # agreed: the vote share a row needs to join the objective
    target_min_agreement: float = 1.0
    # dot (TracIn: the step's first-order effect on the objective) | cosine (LESS: the average
    # cosine with the objective's per-row gradients, blind to gradient norms)
    similarity: str = "dot"
    # dimensions of the random gradient projection
    projection_dim: int = 2048
    # regex over parameter names whose gradients count (None: every trainable parameter)
    parameters: Optional[str] = None
    # rows per batched per-example-gradient computation
    batch_size: int = 32

    def __post_init__(self):
        checks = (
            ("drop_share", 0.0 <= self.drop_share < 1.0, "a share in [0, 1)"),
            ("target", self.target in TARGETS, " | ".join(TARGETS)),
            ("n_target", self.n_target >= 1, "an integer >= 1"),
            ("target_min_agreement", 0.0 <= self.target_min_agreement <= 1.0, "a number in [0, 1]"),
            ("similarity", self.similarity in SIMILARITIES, " | ".join(SIMILARITIES)),
            ("projection_dim", self.projection_dim >= 16, "an integer >= 16"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
        )
        for option, ok, accepted in checks:
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)
        if self.parameters is not None:
            try:
                re.compile(self.parameters)
            except re.error as exc:
                raise OptionError("parameters", self.parameters, f"null or a valid regular expression ({exc})") from None


class GradientSketch:
    """Projected per-example gradients of the SFT loss under one model (incumbent untouched)."""

    def __init__(self, handle, pattern: str | None, dim: int | None, batch_size: int):
        import torch

        self.handle, self.dim, self.batch_size = handle, dim, batch_size
        model = handle.model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and (pattern is None or re.search(pattern, n))]
        if not self.names:
            raise SelfloopError(f"filter.influence.parameters={pattern!r} matches no trainable parameter of the model")
        params = dict(model.named_parameters())
        self.params = {n: params[n].detach() for n in self.names}
        self.size = sum(p.numel() for p in self.params.values())
        generator = torch.Generator().manual_seed(PROJECTION_SEED)
        # CountSketch: coordinate -> (bucket, sign), per parameter tensor
        self.sketch = {} if dim is None else {
            n: (torch.randint(0, dim, (p.numel(),), generator=generator).to(p.device),
                (torch.randint(0, 2, (p.numel(),), generator=generator) * 2 - 1).to(p.device, torch.float32))
            for n, p in self.params.items()
        }
        self.backend = "torch.func.vmap"

    def loss(self, params, ids, labels, causal_mask: bool = False):
        import torch
        from torch.func import functional_call

        inputs = {"input_ids": ids.unsqueeze(0)}
        if causal_mask:
            # an explicit 4D causal mask: with none (or a 2D one) transformers checks the
            # input for padding, data-dependent control flow that vmap cannot trace
            width = ids.shape[0]
            inputs["attention_mask"] = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()[None, None]
        logits = functional_call(self.handle.model, params, args=(), kwargs=inputs).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits.float(), labels[1:], ignore_index=-100)

    def project(self, grads: dict) -> "torch.Tensor":
        import torch

        rows = next(iter(grads.values())).shape[0]
        if self.dim is None:  # no projection: the exact gradients (small parameter sets, checks)
            return torch.cat([g.reshape(rows, -1).float() for g in grads.values()], dim=1)
        out = torch.zeros(rows, self.dim, dtype=torch.float32, device=next(iter(grads.values())).device)
        for n, g in grads.items():
            bucket, sign = self.sketch[n]
            out.index_add_(1, bucket, g.reshape(rows, -1).float() * sign)
        return out

    def batch(self, ids, labels) -> "torch.Tensor":
        import warnings

        import torch
        from torch.func import grad, vmap

        if self.backend == "torch.func.vmap":
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*batching rule.*")  # sdpa's vmap fallback is slower, not wrong
                    return self.project(vmap(grad(self.loss), in_dims=(None, 0, 0, None))(self.params, ids, labels, True))
            except Exception:  # a model vmap cannot trace (data-dependent control flow): one backward per row
                self.backend = "one backward per row"
        out = []
        for i in range(len(ids)):
            params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
            grads = torch.autograd.grad(self.loss(params, ids[i], labels[i]), list(params.values()))
            out.append(self.project({n: g.unsqueeze(0) for n, g in zip(params, grads)}))
        return torch.cat(out)

    def __call__(self, prompts: list[str], answers: list[str], bar=None, reduce=None) -> "torch.Tensor":
        """Projected gradients (rows x dim), or ``reduce`` of each batch of them, concatenated
        (so scoring many rows never holds all their sketches)."""
        import torch

        from selfloop_plugins.optimize.sft import tokenize_rows

        tok = self.handle.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = self.handle.device
        parts = []
        was_training = self.handle.model.training
        self.handle.model.eval()
        try:
            for start in range(0, len(prompts), self.batch_size):
                ids, labels = tokenize_rows(tok, prompts[start : start + self.batch_size], answers[start : start + self.batch_size])
                width = max(len(x) for x in ids)
                # right padding: a causal model's real tokens never attend to it, and it carries no loss
                ids_t = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
                labels_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels], device=device)
                sketches = self.batch(ids_t, labels_t).cpu()
                parts.append(reduce(sketches) if reduce is not None else sketches)
                if bar is not None:
                    bar.update(len(ids))
        finally:
            self.handle.model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, self.dim or self.size)


class Influence(Filter):
    name = "influence"
    Config = InfluenceConfig

    def filter(self, ctx, data):
        import math

        import torch

        from selfloop.progress import progress

        c = self.config
        started = time.perf_counter()
        if not len(data):
            return data.add_column(f"score_{self.name}", [])
        if ctx.model is None:
            raise SelfloopError("filter 'influence' needs the current model for its gradients, and the context has none")
        prompts, answers = list(data["prompt"]), list(data["answer"])
        target_prompts, target_answers, own, source = self.objective(ctx, data)
        if not target_prompts:
            ctx.warn(self.name, f"no held-out rows for the objective (target={c.target}: no training history and no row with agreement >= "
                     f"{c.target_min_agreement}); every row kept unscored")
            ctx.record(self.name, rows_in=len(data), rows_out=len(data), target=source, target_rows=0)
            return data.add_column(f"score_{self.name}", [float("nan")] * len(data))
        sketch = GradientSketch(ctx.model, c.parameters, c.projection_dim, c.batch_size)
        unit = (lambda g: torch.nn.functional.normalize(g, dim=1)) if c.similarity == "cosine" else (lambda g: g)
        with progress(total=len(prompts) + len(target_prompts), desc="influence gradients", unit="row") as bar:
            total = unit(sketch(target_prompts, target_answers, bar)).sum(dim=0)
            # per row: g . total and g . g (the second for leave-one-out), one batch at a time
            dots = sketch(prompts, answers, bar, reduce=lambda g: torch.stack([unit(g) @ total, (unit(g) ** 2).sum(dim=1)], dim=1))
        m = len(target_prompts)
        scores = dots[:, 0] / m
        for i in own:  # leave-one-out: a row of the objective does not vote for itself
            scores[i] = (dots[i, 0] - dots[i, 1]) / (m - 1) if m > 1 else float("nan")
        scores = [float(v) if math.isfinite(float(v)) else 0.0 for v in scores]
        ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        dropped = set(ranked[: int(c.drop_share * len(scores))])
        if c.min_score is not None:
            dropped |= {i for i, s in enumerate(scores) if s < c.min_score}
        keep = [i for i in range(len(scores)) if i not in dropped]
        ctx.record(
            self.name,
            rows_in=len(data),
            rows_out=len(keep),
            target=source,
            target_rows=len(target_prompts),
            similarity=c.similarity,
            parameters=sketch.size,
            projection_dim=c.projection_dim,
            backend=sketch.backend,
            seconds=round(time.perf_counter() - started, 3),
        )
        return data.add_column(f"score_{self.name}", scores).select(keep)

    def objective(self, ctx, data) -> tuple[list[str], list[str], set[int], str]:
        """(prompts, answers) of the held-out objective, the indices of rows of ``data`` that
        are part of it, and which source it came from."""
        from selfloop_plugins.filter.uncertainty import agreement

        c = self.config
        if c.target in ("auto", "history"):
            history = ctx.training_history()
            if len(history) or c.target == "history":
                picked = sorted(ctx.rng.sample(range(len(history)), min(c.n_target, len(history))))
                chosen = history.select(picked)
                return list(chosen["prompt"]), list(chosen["answer"]), set(), "history"
        agreed = [i for i, (comps, a, p) in enumerate(zip(data["completions"], data["answer"], data["prompt"]))
                  if comps and agreement(ctx.task, comps, a) >= c.target_min_agreement - 1e-9 and ctx.task.is_well_formed(p, a)]
        picked = sorted(ctx.rng.sample(agreed, min(c.n_target, len(agreed))))
        prompts, answers = data["prompt"], data["answer"]
        return [prompts[i] for i in picked], [answers[i] for i in picked], set(picked), "agreed"


@hookimpl
def selfloop_register_filters(register):
    register(Influence)
