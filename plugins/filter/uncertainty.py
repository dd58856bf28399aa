"""Keep rows whose pseudo-label the model is confident about, without labels.

Three label-free confidence signals, chosen with ``signal``:

- ``agreement`` (default): the share of a row's sampled completions whose answer matches its
  chosen answer (self-consistency, Wang et al. 2023).
- ``entropy``: the entropy of the answers over the samples, normalised by its maximum
  ``ln(n)``; the score is its complement ``1 - H/ln(n)`` (1: all samples agree, 0: all differ).
  Unlike agreement it looks at the whole vote, not only the chosen answer's share.
- ``logprob``: the mean token log-probability of the chosen answer under the current model
  (Kadavath et al. 2022, "language models (mostly) know what they know"): the acquired rows'
  ``completion_logprobs`` of the completions that gave the answer when present, else one
  forward pass per row with ``ModelHandle.logprobs``.

Every signal's score is higher-is-more-confident (``score_uncertainty``). Rows below the
signal's confidence bound are dropped as too uncertain; optionally rows above a second bound
are dropped as too easy (already known: little to learn from, the survey's "prioritising
low-confidence samples"). A label-free format check (the task's ``is_well_formed``: right
length, right alphabet) drops malformed answers, which voting alone lets through.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Filter

SIGNALS = ("agreement", "entropy", "logprob")


@dataclass
class UncertaintyConfig:
    # agreement (default) | entropy | logprob: the confidence signal that decides
    signal: str = "agreement"
    # agreement: drop rows whose answer has less than this share of the votes
    min_agreement: float = 1.0
    # agreement: drop rows above this share as too easy (None: keep them)
    max_agreement: Optional[float] = None
    # entropy: drop rows whose normalised answer entropy H/ln(n) exceeds this (too uncertain)
    max_entropy: float = 0.5
    # entropy: drop rows below this normalised entropy as too easy (None: keep them)
    min_entropy: Optional[float] = None
    # logprob: drop rows whose answer's mean token log-probability is below this
    min_logprob: float = -0.5
    # logprob: drop rows above this as too easy (None: keep them)
    max_logprob: Optional[float] = None
    require_well_formed: bool = True
    # rows per forward pass when log-probabilities come from the model
    batch_size: int = 256

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise OptionError("signal", self.signal, " | ".join(SIGNALS))
        unit = "a number in [0, 1]"
        for option in ("min_agreement", "max_entropy"):
            if not 0.0 <= getattr(self, option) <= 1.0:
                raise OptionError(option, getattr(self, option), unit)
        for option in ("max_agreement", "min_entropy"):
            value = getattr(self, option)
            if value is not None and not 0.0 <= value <= 1.0:
                raise OptionError(option, value, f"null (no upper band) or {unit}")
        if self.max_agreement is not None and self.max_agreement < self.min_agreement:
            raise OptionError("max_agreement", self.max_agreement, f"null or a share >= min_agreement={self.min_agreement}")
        if self.min_entropy is not None and self.min_entropy > self.max_entropy:
            raise OptionError("min_entropy", self.min_entropy, f"null or a value <= max_entropy={self.max_entropy}")
        if not (self.min_logprob <= 0.0 and math.isfinite(self.min_logprob)):
            raise OptionError("min_logprob", self.min_logprob, "a finite number <= 0 (a mean token log-probability)")
        if self.max_logprob is not None and not self.min_logprob <= self.max_logprob <= 0.0:
            raise OptionError("max_logprob", self.max_logprob, f"null or a number in [min_logprob={self.min_logprob}, 0]")
        if self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, "an integer >= 1")

    def band(self) -> tuple[float, float | None]:
        """(lowest confidence kept, highest confidence kept or None) on the score's scale."""
        if self.signal == "agreement":
            return self.min_agreement, self.max_agreement
        if self.signal == "entropy":  # the score is 1 - normalised entropy
            return 1.0 - self.max_entropy, None if self.min_entropy is None else 1.0 - self.min_entropy
        return self.min_logprob, self.max_logprob


def agreement(task, completions: list[str], answer: str) -> float:
    if not completions:
        return 0.0
    return sum(task.extract_answer(c) == answer for c in completions) / len(completions)


def answer_entropy(task, completions: list[str]) -> float:
    """Entropy of the extracted answers over the samples, normalised to [0, 1] by ln(n);
    1.0 (no evidence of confidence) without samples, 0.0 for one sample."""
    if not completions:
        return 1.0
    if len(completions) == 1:
        return 0.0
    counts = Counter(task.extract_answer(c) for c in completions)
    n = len(completions)
    return -sum(k / n * math.log(k / n) for k in counts.values()) / math.log(n)


def stored_logprob(task, completions: list[str], answer: str, logprobs: list[float] | None) -> float:
    """The mean of the acquired ``completion_logprobs`` over the completions whose answer is
    the chosen one; NaN when the row has none (or they do not match its completions)."""
    logprobs = logprobs or []
    same = [lp for c, lp in zip(completions, logprobs) if lp is not None and math.isfinite(lp) and task.extract_answer(c) == answer]
    return sum(same) / len(same) if same and len(logprobs) == len(completions) else math.nan


def answer_logprobs(ctx, data, batch_size: int = 256) -> tuple[list[float], dict[str, int]]:
    """Mean token log-probability of each row's answer under the current model, and how many
    came from each source: the row's ``completion_logprobs`` (mean over the completions whose
    answer is the chosen one; sampled by the incumbent this round) or a forward pass of
    ``ctx.model`` over prompt + answer for rows without them."""
    from selfloop.progress import progress

    task = ctx.task
    columns = data.column_names
    stored = data["completion_logprobs"] if "completion_logprobs" in columns else [[]] * len(data)
    scores = [stored_logprob(task, c, a, lp) for c, a, lp in zip(data["completions"], data["answer"], stored)]
    missing = [i for i, s in enumerate(scores) if math.isnan(s)]
    sources = {"completion_logprobs": len(data) - len(missing), "model": len(missing)}
    if missing:
        if ctx.model is None:
            raise SelfloopError(
                f"{len(missing)} rows have no completion_logprobs for their answer and there is no model to score them "
                "(the logprob signal needs one or the other)"
            )
        prompts, answers = data["prompt"], data["answer"]
        with progress(total=len(missing), desc="log-probabilities", unit="row") as bar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                values = ctx.model.logprobs([prompts[i] for i in chunk], [answers[i] for i in chunk], batch_size=batch_size)
                for i, v in zip(chunk, values):
                    scores[i] = float(v)
                bar.update(len(chunk))
    return scores, sources


def confidence(ctx, data, signal: str, batch_size: int = 256) -> tuple[list[float], dict]:
    """Per row, the chosen signal's confidence (higher: more confident) and what was used."""
    task = ctx.task
    if signal == "agreement":
        return [agreement(task, c, a) for c, a in zip(data["completions"], data["answer"])], {}
    if signal == "entropy":
        return [1.0 - answer_entropy(task, c) for c in data["completions"]], {}
    scores, sources = answer_logprobs(ctx, data, batch_size)
    return scores, {"logprob_source": sources}


class Uncertainty(Filter):
    name = "uncertainty"
    Config = UncertaintyConfig

    def filter(self, ctx, data):
        c = self.config
        task = ctx.task
        low, high = c.band()
        scores, used = confidence(ctx, data, c.signal, c.batch_size) if len(data) else ([], {})
        unsampled = sum(1 for comps in data["completions"] if not comps) if c.signal != "logprob" else 0
        if unsampled:
            ctx.warn(self.name, f"{unsampled} rows carry no sampled completions: the {c.signal} signal cannot vouch for them and drops them")
        data = data.add_column(f"score_{self.name}", scores)
        keep, uncertain, easy, malformed = [], 0, 0, 0
        for i, (s, p, a) in enumerate(zip(scores, data["prompt"], data["answer"])):
            if not s >= low - 1e-9:  # NaN counts as uncertain
                uncertain += 1
            elif high is not None and s > high + 1e-9:
                easy += 1
            elif c.require_well_formed and not task.is_well_formed(p, a):
                malformed += 1
            else:
                keep.append(i)
        ctx.record(
            self.name,
            signal=c.signal,
            band=[low, high],
            rows_in=len(data),
            rows_out=len(keep),
            dropped_uncertain=uncertain,
            dropped_easy=easy,
            dropped_malformed=malformed,
            **used,
        )
        return data.select(keep)


@hookimpl
def selfloop_register_filters(register):
    register(Uncertainty)
