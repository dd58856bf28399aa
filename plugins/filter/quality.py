"""A learned quality score: a scikit-learn model trained each round on label-free features
against a label-free target, then a threshold or top-k on its predictions.

Quality-estimation filters (e.g. the data-quality classifiers of Gunasekar et al. 2023,
"Textbooks are all you need", and the reward-free quality scorers surveyed by Albalak et al.
2024, "A survey on data selection for language models") learn which cheap signals predict an
expensive judgement, then apply the cheap model to every row. Here, without labels:

- Features, per row: agreement and normalised answer entropy over the samples, the answer's
  mean token log-probability (``completion_logprobs``, or one forward pass when the row has
  none), prompt and answer lengths and their ratio, the number of samples, the task's format
  check, every earlier filter's ``score_*`` column, and the ``score`` of each label-free
  evaluator named in ``evaluators``. Missing values are imputed (logistic) or handled
  natively (gradient boosting).
- Target, measured on ``n_target`` rows sampled with the stage's seed: ``roundtrip`` (the
  model maps its own answer back to the input, for tasks with an ``inverse``; the strongest
  label-free check we have) or ``greedy`` (the model's greedy answer equals the row's voted
  answer: self-consistency across two decoding modes, weaker but available for every task);
  ``auto`` takes roundtrip when the task has an inverse, else greedy. Both need the current
  model. When the measured rows all pass or all fail there is nothing to learn: the filter
  keeps every row (each scores the pass rate), says so with a warning and records
  ``fallback``; so it does when no sampled row could be measured.
- Selection: rows predicted at least as likely to pass as the measured average (``threshold:
  null``), or above a fixed ``threshold``, or the ``top_k`` / ``top_share`` best.

The fitted model is saved with the stage (``artifacts/quality/model.joblib``, plus
``model.json`` with its features and metrics), so a later round or a person can inspect it.
Cost per row: the features (a forward pass only for rows without stored log-probabilities,
and the evaluators' ``score``); the target costs one greedy generation for ``n_target`` rows.
Put it before ``roundtrip`` (or instead of it): after roundtrip every row passes and the
roundtrip target is constant.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Filter

TARGETS = ("auto", "roundtrip", "greedy")
MODELS = ("logistic", "gradient_boosting")


@dataclass
class QualityConfig:
    # auto | roundtrip | greedy: the label-free judgement the model learns to predict
    target: str = "auto"
    # rows on which the target is measured (one generation each)
    n_target: int = 256
    # logistic (regularised logistic regression) | gradient_boosting (HistGradientBoosting)
    model: str = "logistic"
    # keep rows whose predicted pass probability is at least this; None: the pass rate measured
    # on the target rows (keep rows at least as likely to pass as the average row)
    threshold: Optional[float] = None
    # or keep the k best rows (replaces threshold)
    top_k: Optional[int] = None
    # or keep this share of the rows, best first (replaces threshold)
    top_share: Optional[float] = None
    # label-free evaluators (configured in evaluate=[...]) whose per-row score is a feature
    evaluators: list[str] = field(default_factory=list)
    # score rows without stored log-probabilities with a forward pass (else the feature is missing)
    model_logprobs: bool = True

    def __post_init__(self):
        checks = (
            ("target", self.target in TARGETS, " | ".join(TARGETS)),
            ("n_target", self.n_target >= 2, "an integer >= 2"),
            ("model", self.model in MODELS, " | ".join(MODELS)),
            ("threshold", self.threshold is None or 0.0 <= self.threshold <= 1.0, "null (the measured pass rate) or a probability in [0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 1, "null or an integer >= 1"),
            ("top_share", self.top_share is None or 0.0 < self.top_share <= 1.0, "null or a share in (0, 1]"),
        )
        for option, ok, accepted in checks:
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)
        if self.top_k is not None and self.top_share is not None:
            raise OptionError("top_share", self.top_share, f"null when top_k={self.top_k} is set (one selection rule)")


def features(ctx, data, evaluators: list[str], model_logprobs: bool) -> tuple["np.ndarray", list[str], dict]:
    """The label-free feature matrix (rows x features, NaN where unknown), its column names,
    and notes on how it was built."""
    import numpy as np

    from selfloop_plugins.filter.uncertainty import agreement, answer_entropy, answer_logprobs, stored_logprob

    task = ctx.task
    prompts, answers, completions = data["prompt"], data["answer"], data["completions"]
    columns: dict[str, list[float]] = {
        "agreement": [agreement(task, c, a) if c else math.nan for c, a in zip(completions, answers)],
        "entropy": [answer_entropy(task, c) if c else math.nan for c in completions],
        "prompt_chars": [float(len(p)) for p in prompts],
        "answer_chars": [float(len(a)) for a in answers],
        "length_ratio": [len(a) / max(1, len(p)) for p, a in zip(prompts, answers)],
        "n_samples": [float(len(c)) for c in completions],
        "well_formed": [float(task.is_well_formed(p, a)) for p, a in zip(prompts, answers)],
    }
    notes: dict = {}
    if model_logprobs and ctx.model is not None:
        columns["logprob"], notes["logprob_source"] = answer_logprobs(ctx, data)
    else:
        stored = data["completion_logprobs"] if "completion_logprobs" in data.column_names else [[]] * len(data)
        columns["logprob"] = [stored_logprob(task, c, a, lp) for c, a, lp in zip(completions, answers, stored)]
    for name in sorted(c for c in data.column_names if c.startswith("score_")):
        columns[name] = [math.nan if v is None else float(v) for v in data[name]]
    for name in evaluators:
        values = ctx.strategy("evaluate", name).score(ctx, data)
        if len(values) != len(data):
            raise SelfloopError(f"evaluator {name!r} returned {len(values)} scores for {len(data)} rows")
        columns[f"eval_{name}"] = [float(v) for v in values]
    names = list(columns)
    return np.array([columns[n] for n in names], dtype=np.float64).T.reshape(len(data), len(names)), names, notes


class Quality(Filter):
    name = "quality"
    Config = QualityConfig

    def setup(self, ctx):
        c = self.config
        has_inverse = callable(getattr(ctx.task, "inverse", None))
        if c.target == "roundtrip" and not has_inverse:
            raise OptionError("target", c.target, f"auto or greedy: task {ctx.task.name!r} has no inverse(prompt, answer) to check a round trip")
        configured = {e.name: e for e in ctx.strategies.get("evaluate", [])}
        for name in c.evaluators:
            if name not in configured:
                raise OptionError("evaluators", c.evaluators, f"names of configured evaluators ({', '.join(configured) or 'none'}); {name!r} is not one")
            if getattr(configured[name], "uses_references", False):
                raise OptionError("evaluators", c.evaluators, f"label-free evaluators only; {name!r} reads references (meta-evaluation)")

    def target_kind(self, ctx) -> str:
        if self.config.target != "auto":
            return self.config.target
        return "roundtrip" if callable(getattr(ctx.task, "inverse", None)) else "greedy"

    def measure(self, ctx, sample, kind: str) -> list[float]:
        """The label-free target of each sampled row: 1.0 pass, 0.0 fail, NaN unknown."""
        if ctx.model is None:
            raise SelfloopError(f"filter 'quality' measures its {kind} target with the current model, and the context has none")
        if kind == "roundtrip":
            from selfloop_plugins.filter.roundtrip import Roundtrip

            checked = Roundtrip().filter(ctx, sample)  # keeps passes (1.0) and rows it cannot ask (NaN)
            passed = dict(zip(checked["id"], checked["score_roundtrip"]))
            return [float(passed.get(i, 0.0)) for i in sample["id"]]
        out = [math.nan] * len(sample)
        by_level: dict[int, list[int]] = {}
        for i, d in enumerate(sample["difficulty"]):
            by_level.setdefault(d, []).append(i)
        prompts, answers = sample["prompt"], sample["answer"]
        for level, rows in by_level.items():
            gens = ctx.generate([prompts[i] for i in rows], max_new_tokens=ctx.task.max_new_tokens(level), refine=False)
            for i, g in zip(rows, gens):
                out[i] = float(g.answer == answers[i])
        return out

    def filter(self, ctx, data):
        import numpy as np

        c = self.config
        if not len(data):
            return data.add_column(f"score_{self.name}", [])
        kind = self.target_kind(ctx)
        x, names, notes = features(ctx, data, c.evaluators, c.model_logprobs)
        picked = sorted(ctx.rng.sample(range(len(data)), min(c.n_target, len(data))))
        y = np.array(self.measure(ctx, data.select(picked), kind))
        known = ~np.isnan(y)
        if not known.any():
            ctx.warn(self.name, f"the {kind} target could not be measured on any of {len(picked)} sampled rows; every row kept unscored")
            ctx.record(self.name, target=kind, rows_in=len(data), rows_out=len(data), fallback="no measurable target: nothing filtered")
            return data.add_column(f"score_{self.name}", [math.nan] * len(data))
        x_train, y_train = x[picked][known], y[known].astype(int)
        fitted, metrics = self.fit(ctx, x_train, y_train, names)
        scores = fitted.predict_proba(x)[:, list(fitted.classes_).index(1)] if 1 in fitted.classes_ else np.zeros(len(data))
        # a constant model has nothing to say: keep every row (the warning says why)
        keep = list(range(len(data))) if "fallback" in metrics else self.select(scores, float(y_train.mean()))
        metrics.update(target=kind, rows_in=len(data), rows_out=len(keep), features=names, **notes)
        if c.threshold is None and c.top_k is None and c.top_share is None and "fallback" not in metrics:
            metrics["threshold"] = round(float(y_train.mean()), 4)
        ctx.record(self.name, **metrics)
        self.save(ctx, fitted, names, metrics)
        return data.add_column(f"score_{self.name}", [float(s) for s in scores]).select(keep)

    def fit(self, ctx, x, y, names: list[str]):
        """The fitted model and its training metrics; a constant model when the target is."""
        import numpy as np
        from sklearn.dummy import DummyClassifier
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        c = self.config
        seed = ctx.rng.randrange(2**31)
        metrics: dict = {"train_rows": int(len(y)), "positive_rate": round(float(y.mean()), 4) if len(y) else None, "model": c.model}
        if len(set(y.tolist())) < 2:
            rate = float(y.mean()) if len(y) else 0.0
            ctx.warn(self.name, f"the target passed on {rate:.0%} of {len(y)} measured rows: nothing to learn; every row kept, scored {rate:.2f}")
            metrics["fallback"] = f"constant target ({rate:.2f}): no classifier trained, nothing filtered"
            return DummyClassifier(strategy="prior").fit(np.zeros((len(y), len(names))), y), metrics
        if c.model == "logistic":
            estimator = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                                      LogisticRegression(max_iter=1000, random_state=seed))
        else:
            from sklearn.ensemble import HistGradientBoostingClassifier

            estimator = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
        minority = int(min(np.bincount(y)))
        if minority >= 2:
            folds = StratifiedKFold(n_splits=min(3, minority), shuffle=True, random_state=seed)
            metrics["cv_auc"] = round(float(np.mean(cross_val_score(estimator, x, y, cv=folds, scoring="roc_auc"))), 4)
        estimator.fit(x, y)
        metrics["train_auc"] = round(float(roc_auc_score(y, estimator.predict_proba(x)[:, 1])), 4)
        if c.model == "logistic":
            metrics["coefficients"] = {n: round(float(w), 4) for n, w in zip(names, estimator[-1].coef_[0])}
        return estimator, metrics

    def select(self, scores, pass_rate: float) -> list[int]:
        import numpy as np

        c = self.config
        if c.top_k is None and c.top_share is None:
            threshold = pass_rate if c.threshold is None else c.threshold
            return [i for i, s in enumerate(scores) if s >= threshold - 1e-12]
        k = c.top_k if c.top_k is not None else int(math.ceil(c.top_share * len(scores)))
        best = np.argsort(-np.asarray(scores), kind="stable")[:k]
        return sorted(best.tolist())

    def save(self, ctx, fitted, names: list[str], metrics: dict) -> None:
        import joblib
        import sklearn

        buffer = io.BytesIO()
        joblib.dump({"model": fitted, "features": names}, buffer)
        ctx.save_artifact(self.name, "model.joblib", buffer.getvalue())
        info = {"features": names, "sklearn": sklearn.__version__, "metrics": metrics,
                "load": "joblib.load(path)['model'].predict_proba(features)[:, 1]"}
        ctx.save_artifact(self.name, "model.json", json.dumps(info, indent=2, default=str))


@hookimpl
def selfloop_register_filters(register):
    register(Quality)
