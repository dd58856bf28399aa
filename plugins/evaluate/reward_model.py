"""A reward model trained without human labels, then used to score rows and models.

**Preferences** come from the model's own label-free checks, never from references: for
unlabelled prompts, the candidate answers (the greedy one, the distinct sampled ones, and a
few corrupted copies of the greedy one: a swapped, dropped, duplicated or replaced
character) are labelled by the ``preference`` signal — ``roundtrip`` (the model maps the
answer back to the input through the task's ``inverse``), ``agreement`` (the answer is the
majority of the model's samples) or ``judge`` (the configured ``evaluate/judge`` grades it
>= 0.5) — and every (passing, failing) pair of answers to the same prompt is a preference.
**The model** is Bradley–Terry over label-free features of an answer under the model
(``agreement`` with the samples, mean token ``logprob``, ``well_formed``, ``length_ratio``,
``roundtrip``), fitted as a scikit-learn logistic regression on feature differences; the
reward of an answer is ``sigmoid(w . standardized features)``. The preference signal is not
allowed among the features (a model that sees its label learns nothing; with ``preference:
auto`` it is dropped from them, with a warning), so the reward
model distils an expensive check (the round trip: one more generation per answer) into
signals any row has. It follows Ouyang et al. 2022's pairwise reward model with the labels of
RLAIF / self-rewarding (Lee et al. 2023; Yuan et al. 2024) replaced by self-verification.

Why scikit-learn and not TRL's ``RewardTrainer``: at our scale (a 0.1–0.6M-parameter
character model, a few hundred pairs) a reward head fine-tuned on such a model learns little
from so few pairs and costs minutes; five features and a logistic regression train in
milliseconds, deterministically, and are readable (the weights are in the artifact).

**Where it is trained**: once per run, in the first stage that needs it — normally round 0's
evaluate stage, on the bootstrap model's answers to prompts of ``train_levels`` (default: the
levels evaluated then) — and saved as JSON with ``ctx.save_artifact`` in
``round-000/evaluate/artifacts/reward_model/reward_model.json``. Every later round loads that
file, so scores compare across rounds (the promotion gate compares a candidate's score with
the incumbent's from its own round). No pickle: the file is plain numbers.

Cost: training, once: ``n_train_per_level`` x (1 + ``n_samples``) generations per level plus
one round trip and one log-prob pass per candidate answer. Evaluation per model and level:
``n_per_level`` x (1 + ``n_samples``) generations, one log-prob pass, and the round trip if it
is a feature.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Evaluator
from selfloop_plugins.evaluate.multi import check_choice, fixed_problems, has_inverse, measure, roundtrip_passes, sampling_seed
from selfloop_plugins.filter.uncertainty import agreement
from selfloop_plugins.refine.self_consistency import majority

FEATURES = ("agreement", "logprob", "well_formed", "length_ratio", "roundtrip")
PREFERENCES = ("auto", "roundtrip", "agreement", "judge")
ARTIFACT = "reward_model.json"


@dataclass
class RewardModelConfig:
    # what makes one answer preferred over another: auto (roundtrip when the task has an
    # inverse, else agreement), roundtrip, agreement, judge (evaluate/judge's grades)
    preference: str = "auto"
    features: list[str] = field(default_factory=lambda: ["agreement", "logprob", "well_formed", "length_ratio"])
    # levels whose prompts train it (empty: the levels evaluated where it is trained)
    train_levels: list[int] = field(default_factory=list)
    n_train_per_level: int = 64
    # corrupted copies of each greedy answer added as candidates
    corruptions: int = 2
    n_per_level: int = 32
    n_samples: int = 4
    temperature: float = 0.7
    # inverse regularization strength (scikit-learn's C)
    regularization: float = 1.0

    def __post_init__(self):
        check_choice("preference", self.preference, PREFERENCES)
        bad = [f for f in self.features if f not in FEATURES]
        if bad or not self.features or len(set(self.features)) != len(self.features):
            raise OptionError("features", list(self.features), f"a non-empty list of distinct features from {', '.join(FEATURES)}")
        if self.preference in self.features:
            raise OptionError("features", list(self.features), f"features other than the preference signal {self.preference!r} (a reward model that sees its own label learns nothing)")
        for option, ok, accepted in (
            ("n_train_per_level", self.n_train_per_level >= 2, "an integer >= 2"),
            ("corruptions", self.corruptions >= 0, "an integer >= 0"),
            ("n_per_level", self.n_per_level >= 1, "an integer >= 1"),
            ("n_samples", self.n_samples >= 0, "an integer >= 0"),
            ("temperature", self.temperature > 0, "a number > 0"),
            ("regularization", self.regularization > 0, "a number > 0"),
        ):
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)
        if self.n_samples < 1 and ("agreement" in self.features or self.preference in ("auto", "agreement")):
            raise OptionError("n_samples", self.n_samples, "an integer >= 1 (agreement compares an answer with sampled ones)")


def corrupt(answer: str, rng: random.Random, alphabet: str) -> str | None:
    """A small edit of an answer (swap, drop, duplicate or replace one character)."""
    if not answer:
        return None
    i = rng.randrange(len(answer))
    op = rng.choice(("swap", "drop", "duplicate", "replace"))
    if op == "swap" and len(answer) > 1:
        j = i + 1 if i + 1 < len(answer) else i - 1
        chars = list(answer)
        chars[i], chars[j] = chars[j], chars[i]
        out = "".join(chars)
    elif op == "drop" and len(answer) > 1:
        out = answer[:i] + answer[i + 1 :]
    elif op == "duplicate":
        out = answer[:i] + answer[i] + answer[i:]
    else:
        pool = [c for c in (alphabet or answer) if c != answer[i]] or [answer[i]]
        out = answer[:i] + rng.choice(pool) + answer[i + 1 :]
    return out if out != answer else None


@dataclass
class Fitted:
    """The trained reward model: standardized features, Bradley–Terry weights."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    info: dict

    def reward(self, rows: list[list[float]]) -> list[float]:
        out = []
        for x in rows:
            z = sum(w * (v - m) / s for w, v, m, s in zip(self.weights, x, self.mean, self.scale))
            out.append(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z)))))
        return out

    def to_json(self) -> str:
        return json.dumps({"features": self.features, "mean": self.mean, "scale": self.scale, "weights": self.weights, **self.info}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Fitted:
        d = json.loads(text)
        return cls(d.pop("features"), d.pop("mean"), d.pop("scale"), d.pop("weights"), d)


class RewardModel(Evaluator):
    name = "reward_model"
    Config = RewardModelConfig
    uses_references = False

    def __init__(self, config=None):
        super().__init__(config)
        self._fitted: dict[str, Fitted] = {}  # per run directory

    # -- configuration -------------------------------------------------------------------
    def preference(self, task) -> str:
        p = self.config.preference
        return p if p != "auto" else ("roundtrip" if has_inverse(task) else "agreement")

    def used_features(self, task) -> list[str]:
        """The configured features, less the signal ``preference: auto`` chose as the label."""
        pref = self.preference(task)
        return [f for f in self.config.features if f != pref]

    def setup(self, ctx):
        c, task = self.config, ctx.task
        pref, used = self.preference(task), self.used_features(task)
        if not used:
            raise OptionError("features", list(c.features), f"at least one feature besides the preference signal {pref!r} (preference=auto chose it for task {task.name!r})")
        if len(used) < len(c.features):
            ctx.warn(self.name, f"preference=auto chose {pref!r} for task {task.name!r}, so it is the label, not a feature: features {used}")
        if "roundtrip" in (pref, *used) and not has_inverse(task):
            raise OptionError("preference" if pref == "roundtrip" else "features", pref if pref == "roundtrip" else list(c.features),
                              f"signals task {task.name!r} offers: it has no inverse(prompt, answer), so no round trip")
        if pref == "judge" and not any(e.name == "judge" for e in ctx.strategies.get("evaluate", [])):
            raise OptionError("preference", "judge", "roundtrip or agreement, or add evaluate 'judge' to the run (preference=judge uses its grades)")
        bad = [v for v in c.train_levels if v not in task.levels]
        if bad:
            raise OptionError("train_levels", list(c.train_levels), f"levels of task {task.name!r} ({task.levels[0]}..{task.levels[-1]})")

    # -- features and preferences ----------------------------------------------------------
    def features(self, ctx, model, prompts: list[str], answers: list[str], samples: list[list[str]]) -> list[list[float]]:
        """The label-free features of each (prompt, answer) under ``model``; ``samples`` are
        the extracted answers the model sampled for the prompt."""
        task, names = ctx.task, self.used_features(ctx.task)
        cols: dict[str, list[float]] = {}
        if "agreement" in names:
            cols["agreement"] = [agreement(task, s, a) if s else 0.0 for s, a in zip(samples, answers)]
        if "logprob" in names:
            if not callable(getattr(model, "logprobs", None)):
                raise SelfloopError(f"evaluate 'reward_model': feature 'logprob' needs a model with logprobs(); {type(model).__name__} has none (drop it from evaluate.reward_model.features)")
            cols["logprob"] = [float(v) if math.isfinite(v) else -30.0 for v in model.logprobs(prompts, answers)] if prompts else []
        if "well_formed" in names:
            cols["well_formed"] = [float(task.is_well_formed(p, a)) for p, a in zip(prompts, answers)]
        if "length_ratio" in names:
            cols["length_ratio"] = [len(a) / max(1, len(p)) for p, a in zip(prompts, answers)]
        if "roundtrip" in names:
            cols["roundtrip"] = [0.0 if r is None else r for r in roundtrip_passes(task, model, prompts, answers)] if prompts else []
        return [[cols[n][i] for n in names] for i in range(len(prompts))]

    def labels(self, ctx, model, prompts: list[str], answers: list[str], samples: list[list[str]]) -> list[float | None]:
        """The preference signal per candidate answer: 1 preferred, 0 not, None unknown."""
        pref = self.preference(ctx.task)
        if pref == "roundtrip":
            return roundtrip_passes(ctx.task, model, prompts, answers)
        if pref == "agreement":
            out: list[float | None] = []
            for s, a in zip(samples, answers):
                top, share = majority(s)
                out.append(float(bool(s) and a == top and share >= 0.5))
            return out
        judge = ctx.strategy("evaluate", "judge")
        grades = judge.judge(ctx, judge.grader(ctx, model), prompts, answers, [f"{self.name}-train-{i}" for i in range(len(prompts))])
        return [None if g is None else float(g >= 0.5) for g in grades]

    # -- training ----------------------------------------------------------------------------
    def train(self, ctx, model) -> Fitted:
        """Fit on the model's own answers to unlabelled prompts; save the artifact."""
        from sklearn.linear_model import LogisticRegression

        c, task = self.config, ctx.task
        levels = list(c.train_levels) or list(ctx.eval_levels)
        rng = random.Random(f"{ctx.seed}:{self.name}:train")
        groups: list[tuple[str, list[str], list[str]]] = []  # prompt, candidate answers, its samples
        for level in levels:
            prompts = [p.prompt for p in task.sample(random.Random(f"{ctx.seed}:{self.name}:train:{level}"), level, c.n_train_per_level)]
            s = measure(ctx, model, prompts, level, n_samples=c.n_samples, temperature=c.temperature, roundtrip=False, key=(self.name, "train", level))
            for prompt, answer, sampled in zip(prompts, s.answers, s.samples):
                extracted = [task.extract_answer(x) for x in sampled]
                cands = list(dict.fromkeys([answer, *extracted]))
                for _ in range(c.corruptions):
                    bad = corrupt(answer, rng, task.alphabet or "")
                    if bad is not None and bad not in cands:
                        cands.append(bad)
                groups.append((prompt, cands, extracted))
        flat_p = [p for p, cands, _ in groups for _ in cands]
        flat_a = [a for _, cands, _ in groups for a in cands]
        flat_s = [s for _, cands, s in groups for _ in cands]
        with sampling_seed(ctx, self.name, "train", "features"):
            x = self.features(ctx, model, flat_p, flat_a, flat_s)
            y = self.labels(ctx, model, flat_p, flat_a, flat_s)
        pairs, i = [], 0
        for g, (_, cands, _) in enumerate(groups):
            idx = range(i, i + len(cands))
            good = [j for j in idx if y[j] == 1.0]
            bad = [j for j in idx if y[j] == 0.0]
            pairs += [(g, j, k) for j in good for k in bad]
            i += len(cands)
        labelled = [v for v in y if v is not None]
        if not pairs:
            raise SelfloopError(
                f"evaluate 'reward_model' found no preference pair in round {ctx.round}: of {len(labelled)} candidate answers on levels {levels}, "
                f"{int(sum(labelled))} passed the {self.preference(task)} check and none shared a prompt with one that failed; "
                "train it on levels where the model is partly right (evaluate.reward_model.train_levels)"
            )
        features = self.used_features(task)
        n = len(features)
        mean = [sum(r[f] for r in x) / len(x) for f in range(n)]
        scale = [math.sqrt(sum((r[f] - mean[f]) ** 2 for r in x) / len(x)) or 1.0 for f in range(n)]
        z = [[(r[f] - mean[f]) / scale[f] for f in range(n)] for r in x]
        held = {g for g in range(len(groups)) if g % 5 == 4}  # every fifth prompt checks generalization
        train = [(j, k) for g, j, k in pairs if g not in held] or [(j, k) for _, j, k in pairs]
        diffs = [[a - b for a, b in zip(z[j], z[k])] for j, k in train]
        fit = LogisticRegression(C=c.regularization, fit_intercept=False).fit(diffs + [[-d for d in row] for row in diffs], [1] * len(diffs) + [0] * len(diffs))
        weights = [float(w) for w in fit.coef_[0]]

        def pair_accuracy(which):
            ok = [sum(w * (a - b) for w, a, b in zip(weights, z[j], z[k])) > 0 for j, k in which]
            return round(sum(ok) / len(ok), 4) if ok else None

        test = [(j, k) for g, j, k in pairs if g in held]
        info = {"preference": self.preference(task), "trained_round": ctx.round, "trained_stage": ctx.stage, "levels": levels, "pairs": len(pairs),
                "candidates": len(x), "preferred_share": round(sum(labelled) / max(1, len(labelled)), 4),
                "train_pair_accuracy": pair_accuracy(train), "heldout_pair_accuracy": pair_accuracy(test)}
        fitted = Fitted(features, mean, scale, weights, info)
        ctx.record(self.name, trained=True, **{k: v for k, v in info.items() if k not in ("trained_stage",)}, weights=dict(zip(features, weights)))
        if ctx.stage:
            ctx.save_artifact(self.name, ARTIFACT, fitted.to_json())
        return fitted

    def fitted(self, ctx, model) -> Fitted:
        """The run's reward model: cached, else the first one an earlier stage saved, else
        trained now on ``model``."""
        from selfloop.rundir import STAGE_ORDER

        key = str(ctx.run_dir.root)
        if key in self._fitted:
            return self._fitted[key]
        rd = ctx.run_dir
        for r in range(ctx.round):
            for stage in STAGE_ORDER:
                path = rd.stage_dir(r, stage) / "artifacts" / self.name / ARTIFACT
                if rd.is_complete(r, stage) and path.is_file():
                    rd.verify(r, stage)
                    fitted = Fitted.from_json(path.read_text())
                    if fitted.features != self.used_features(ctx.task):
                        raise SelfloopError(f"{path} was trained on features {fitted.features}, this run asks for {self.used_features(ctx.task)}")
                    self._fitted[key] = fitted
                    return fitted
        self._fitted[key] = self.train(ctx, model)
        return self._fitted[key]

    # -- scoring -----------------------------------------------------------------------------
    def score(self, ctx, data):
        """The reward of each row's answer (agreement from the row's completions; the other
        features under the incumbent ``ctx.model``)."""
        if not len(data):
            return []
        model = ctx.model
        fitted = self.fitted(ctx, model)
        samples = [[ctx.task.extract_answer(x) for x in comps] for comps in data["completions"]]
        with sampling_seed(ctx, self.name, "score"):
            x = self.features(ctx, model, list(data["prompt"]), list(data["answer"]), samples)
        return fitted.reward(x)

    def evaluate(self, ctx, model):
        c = self.config
        fitted = self.fitted(ctx, model)
        by_level = {}
        for level in ctx.eval_levels:
            prompts = [p.prompt for p in fixed_problems(ctx, self.name, level, c.n_per_level)]
            s = measure(ctx, model, prompts, level, n_samples=c.n_samples, temperature=c.temperature, roundtrip=False, key=(self.name, level))
            with sampling_seed(ctx, self.name, level, "features"):
                x = self.features(ctx, model, prompts, s.answers, [[ctx.task.extract_answer(t) for t in more] for more in s.samples])
            rewards = fitted.reward(x)
            by_level[str(level)] = sum(rewards) / len(rewards)
        return {"score": sum(by_level.values()) / len(by_level), "by_level": by_level, "trained_round": fitted.info.get("trained_round"), "pairs": fitted.info.get("pairs")}


@hookimpl
def selfloop_register_evaluators(register):
    register(RewardModel)
