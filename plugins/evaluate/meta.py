"""Meta-evaluation of the evaluators: which of them can be trusted on this task?

On a task with ground truth, for every other configured evaluator:

- **rank correlation across candidates**: Spearman's rho between the evaluator's score of
  each earlier round's candidate (promoted or rejected; its ``by_level`` value at the
  curriculum level of that round, else its overall score) and the candidate's ground-truth
  accuracy at that level (the ``by_level`` of a reference-using evaluator such as
  ``exact_match`` in the same evaluate stage). Needs ``min_candidates`` candidates.
- **rows it keeps**: its ``score`` on this round's acquired rows (``n_rows``, references
  held back from it); the rows scoring >= ``keep_threshold`` are "kept": their share, their
  label precision against the references, Cohen's kappa between keeping and being right,
  and the calibration of the scores (expected calibration error, 10 bins) when they lie in
  [0, 1].
- **agreement among evaluators**: Cohen's kappa for every pair of keep decisions and
  Krippendorff's alpha (nominal) over all of them; and each filter's label precision (kept
  and dropped rows, from the round records).

An evaluator is **trusted** when every measure available for it passes (``rho >=
min_spearman``, ``kappa >= min_kappa``), untrusted when one fails, unknown without evidence.
The score is the share of judged evaluators that are trusted. It reads references
(``uses_references = True``): the core reports it as meta-evaluation only; it never steers
promotion or training. After Chiang & Lee 2023 / Zheng et al. 2023 (judges validated by
agreement with ground truth) and Krippendorff 2004.

Cost per round: the history is read from the run directory (free); the row measures call
every other evaluator's ``score`` on ``n_rows`` rows (what that costs depends on them).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Evaluator


@dataclass
class MetaConfig:
    min_candidates: int = 4
    min_spearman: float = 0.6
    min_kappa: float = 0.3
    keep_threshold: float = 0.5
    # acquired rows scored by every evaluator (0: no row measures)
    n_rows: int = 256

    def __post_init__(self):
        for option, ok, accepted in (
            ("min_candidates", self.min_candidates >= 3, "an integer >= 3 (a rank correlation of fewer points means nothing)"),
            ("min_spearman", -1.0 <= self.min_spearman <= 1.0, "a number in [-1, 1]"),
            ("min_kappa", -1.0 <= self.min_kappa <= 1.0, "a number in [-1, 1]"),
            ("keep_threshold", math.isfinite(self.keep_threshold), "a finite number"),
            ("n_rows", self.n_rows >= 0, "an integer >= 0"),
        ):
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)


# -- statistics ----------------------------------------------------------------------------------
def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho; None when the truth does not vary (nothing to rank), 0.0 when only
    the evaluator's scores are constant (it cannot tell candidates apart)."""
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(y)) < 2:
        return None
    if len(set(x)) < 2:
        return 0.0
    rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def cohen_kappa(a: list[bool], b: list[bool]) -> float | None:
    n = len(a)
    if not n:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe >= 1.0 else (po - pe) / (1 - pe)


def krippendorff_alpha(decisions: list[list[bool]]) -> float | None:
    """Nominal Krippendorff's alpha of several raters' decisions on the same units."""
    if len(decisions) < 2 or not decisions[0]:
        return None
    o = {(c, k): 0.0 for c in (False, True) for k in (False, True)}
    m = len(decisions)
    for unit in zip(*decisions):
        for i in range(m):
            for j in range(m):
                if i != j:
                    o[(unit[i], unit[j])] += 1.0 / (m - 1)
    n_c = {c: o[(c, False)] + o[(c, True)] for c in (False, True)}
    n = n_c[False] + n_c[True]
    expected = 2 * n_c[False] * n_c[True] / (n - 1)
    return None if expected == 0 else 1.0 - 2 * o[(False, True)] / expected


def calibration_error(scores: list[float], truth: list[bool], bins: int = 10) -> float | None:
    """Expected calibration error of scores in [0, 1] against 0/1 truth."""
    if not scores or any(not (0.0 <= s <= 1.0) for s in scores):
        return None
    total = 0.0
    for b in range(bins):
        idx = [i for i, s in enumerate(scores) if (b / bins <= s < (b + 1) / bins) or (b == bins - 1 and s == 1.0)]
        if idx:
            total += len(idx) / len(scores) * abs(sum(scores[i] for i in idx) / len(idx) - sum(truth[i] for i in idx) / len(idx))
    return total


def at_level(result: dict[str, Any], level: int) -> float | None:
    by_level = result.get("by_level") or {}
    value = by_level.get(str(level), result.get("score"))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# -- the evaluator -------------------------------------------------------------------------------
class Meta(Evaluator):
    name = "meta"
    Config = MetaConfig
    uses_references = True

    def others(self, ctx) -> list[Any]:
        return [e for e in ctx.strategies.get("evaluate", []) if e.name != self.name]

    def candidates(self, ctx) -> list[dict[str, Any]]:
        """Every earlier round's candidate: its level, ground truth there and each
        evaluator's result (from the round's evaluate stage)."""
        rd, out = ctx.run_dir, []
        for r in range(ctx.round):
            if not rd.is_complete(r, "evaluate"):
                continue
            metrics = rd.stage_metrics(r, "evaluate")
            evals, level = metrics.get("evaluators") or {}, metrics.get("level")
            truth = next((at_level(v, level) for n, v in evals.items() if v.get("uses_references") and n != self.name and str(level) in (v.get("by_level") or {})), None)
            if truth is not None:
                out.append({"round": r, "level": level, "truth": truth, "evaluators": evals})
        return out

    def rows(self, ctx):
        """This round's acquired rows (else the latest earlier round's), with references."""
        from selfloop.data import conform, load

        rd = ctx.run_dir
        for r in range(ctx.round, 0, -1):
            if rd.is_complete(r, "acquire"):
                rd.verify(r, "acquire")
                data = conform(load(rd.stage_dir(r, "acquire") / "data"))
                keep = [i for i, ref in enumerate(data["reference"]) if ref is not None]
                rng = random.Random(f"{ctx.seed}:{self.name}:{r}")
                chosen = sorted(rng.sample(keep, min(self.config.n_rows, len(keep))))
                return data.select(chosen), r
        return None, None

    def row_scores(self, ctx, evaluator, data) -> list[float]:
        from selfloop.data import blind

        scores = evaluator.score(ctx, data if getattr(evaluator, "uses_references", False) else blind(data))
        scores = [float(s) for s in scores]
        if len(scores) != len(data):
            raise ValueError(f"score() returned {len(scores)} scores for {len(data)} rows")
        return scores

    def score(self, ctx, data):
        """Per row: the share of the other evaluators whose keep decision (score >=
        keep_threshold) matches whether the row's answer is right."""
        if "reference" not in data.column_names:
            raise ValueError("evaluate.meta scores rows against references; this data has none")
        truth = [r is not None and ctx.task.check(a, r) for a, r in zip(data["answer"], data["reference"])]
        others = self.others(ctx)
        if not others or not len(data):
            return [0.0] * len(data)
        right = [0] * len(data)
        for e in others:
            for i, s in enumerate(self.row_scores(ctx, e, data)):
                right[i] += (s >= self.config.keep_threshold) == truth[i]
        return [v / len(others) for v in right]

    def evaluate(self, ctx, model):
        c = self.config
        report: dict[str, dict[str, Any]] = {}
        cands = self.candidates(ctx)
        names = list(dict.fromkeys(n for cand in cands for n in cand["evaluators"] if n != self.name))
        for n in names:
            pts = [(at_level(cand["evaluators"][n], cand["level"]), cand["truth"]) for cand in cands if n in cand["evaluators"]]
            pts = [(x, y) for x, y in pts if x is not None]
            entry = report.setdefault(n, {})
            entry["candidates"] = len(pts)
            entry["spearman"] = spearman([x for x, _ in pts], [y for _, y in pts]) if len(pts) >= c.min_candidates else None
            if pts and all(0.0 <= x <= 1.0 for x, _ in pts):
                entry["calibration_gap"] = sum(abs(x - y) for x, y in pts) / len(pts)

        decisions: dict[str, list[bool]] = {}
        data, from_round = (self.rows(ctx) if c.n_rows else (None, None))
        if data is not None and len(data):
            truth = [ctx.task.check(a, r) for a, r in zip(data["answer"], data["reference"])]
            for e in self.others(ctx):
                entry = report.setdefault(e.name, {})
                try:
                    scores = self.row_scores(ctx, e, data)
                except Exception as exc:  # reported, not fatal: meta-evaluation must not stop the run
                    entry["row_error"] = f"{type(exc).__name__}: {exc}"
                    ctx.warn(self.name, f"could not score rows with evaluate '{e.name}': {entry['row_error']}")
                    continue
                keep = [s >= c.keep_threshold for s in scores]  # NaN is never kept
                decisions[e.name] = keep
                kept_truth = [t for t, k in zip(truth, keep) if k]
                entry.update(rows=len(keep), kept_share=sum(keep) / len(keep), precision_kept=sum(kept_truth) / len(kept_truth) if kept_truth else None,
                             kappa_with_truth=cohen_kappa(keep, truth), calibration_error=calibration_error([s for s in scores if math.isfinite(s)], [t for s, t in zip(scores, truth) if math.isfinite(s)]))
        for n, entry in report.items():
            checks = [v >= c.min_spearman for v in [entry.get("spearman")] if v is not None]
            checks += [v >= c.min_kappa for v in [entry.get("kappa_with_truth")] if v is not None]
            entry["trusted"] = all(checks) if checks else None
        names_with_rows = list(decisions)
        pairwise = {f"{a}|{b}": cohen_kappa(decisions[a], decisions[b]) for i, a in enumerate(names_with_rows) for b in names_with_rows[i + 1 :]}
        filters: dict[str, dict[str, list[float]]] = {}
        for record in ctx.history():
            for step in record.get("funnel") or []:
                f = filters.setdefault(step["filter"], {"precision_kept": [], "precision_dropped": []})
                for k in ("precision_kept", "precision_dropped"):
                    if step.get(k) is not None:
                        f[k].append(step[k])
        judged = {n: e["trusted"] for n, e in report.items() if e["trusted"] is not None}
        if not judged:
            ctx.warn(self.name, "no evidence yet to judge any evaluator (needs earlier candidates with ground truth, or acquired rows with references); score 0")
        trusted = sorted(n for n, t in judged.items() if t)
        ctx.record(self.name, trusted=trusted, untrusted=sorted(n for n, t in judged.items() if not t), candidates=len(cands))
        return {
            "score": len(trusted) / len(judged) if judged else 0.0,
            "evaluators": report,
            "agreement": {"pairwise_kappa": pairwise, "krippendorff_alpha": krippendorff_alpha([decisions[n] for n in names_with_rows])},
            "filters": {n: {k: (sum(v) / len(v) if v else None) for k, v in f.items()} for n, f in filters.items()},
            "candidates": len(cands),
            "rows_from_round": from_round,
        }


@hookimpl
def selfloop_register_evaluators(register):
    register(Meta)
