"""A guard against model collapse and drift (observer hooks; on whenever selfloop is installed).

Round by round it measures, from the run directory:

- **output diversity** of the answers the incumbent gave to the round's acquired problems:
  the share of distinct answers and the Shannon entropy (bits) of their character n-grams;
- **loss on the bootstrap data**: the candidate's mean negative log-likelihood per token on a
  fixed sample of round 0's labelled rows (forgetting shows as a rise);
- the **distribution of difficulties acquired**.

It flags **collapse** when, from round 2 on, the distinct-answer share or the n-gram entropy
falls below a fraction of round 1's (the bootstrap model's own answers: the baseline), and
**drift** when a candidate's bootstrap loss exceeds the bootstrap model's by more than a
margin. Findings go to ``RUN_DIR/drift.jsonl``, one line per round, rewritten whole and keyed
by round, so events replayed on resume (``replayed=True``) overwrite rather than repeat. A
flag is logged; by default collapse also stops the run (``ctx.request_stop``; the core
stops after the round, status ``stopped``). Model collapse after Shumailov et al. 2024 ("AI
models collapse when trained on recursively generated data").

Observers have no Hydra options; settings come from environment variables (defaults in
brackets): ``SELFLOOP_DRIFT_STOP`` [collapse] (never | collapse | any),
``SELFLOOP_DRIFT_MIN_DISTINCT_RATIO`` [0.5], ``SELFLOOP_DRIFT_MIN_ENTROPY_RATIO`` [0.5],
``SELFLOOP_DRIFT_MAX_LOSS_RISE`` [1.0 nats/token], ``SELFLOOP_DRIFT_NGRAM`` [2],
``SELFLOOP_DRIFT_LOSS_ROWS`` [256; 0 measures no loss, e.g. for a model too large to load twice]. ``SELFLOOP_DISABLE_PLUGINS=drift`` turns it off.

Cost per round: one pass over the acquired answers and one log-prob pass of the candidate
over ``LOSS_ROWS`` bootstrap rows (no generation, so no generation budget is spent).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

from selfloop import hookimpl
from selfloop.errors import SelfloopError

FILENAME = "drift.jsonl"
STOP_POLICIES = ("never", "collapse", "any")


@dataclass
class DriftSettings:
    stop: str = "collapse"
    min_distinct_ratio: float = 0.5
    min_entropy_ratio: float = 0.5
    max_loss_rise: float = 1.0
    ngram: int = 2
    loss_rows: int = 256

    def __post_init__(self):
        for name, ok, accepted in (
            ("stop", self.stop in STOP_POLICIES, ", ".join(STOP_POLICIES)),
            ("min_distinct_ratio", 0.0 <= self.min_distinct_ratio <= 1.0, "a number in [0, 1]"),
            ("min_entropy_ratio", 0.0 <= self.min_entropy_ratio <= 1.0, "a number in [0, 1]"),
            ("max_loss_rise", self.max_loss_rise >= 0, "a number >= 0"),
            ("ngram", self.ngram >= 1, "an integer >= 1"),
            ("loss_rows", self.loss_rows >= 0, "an integer >= 0 (0: no loss measured)"),
        ):
            if not ok:
                raise SelfloopError(f"bad environment variable {env_name(name)}={getattr(self, name)!r}: accepted: {accepted}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DriftSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw) if kind is not str else raw
            except ValueError:
                raise SelfloopError(f"bad environment variable {env_name(f.name)}={raw!r}: accepted: {'an integer' if kind is int else 'a number'}") from None
        return cls(**values)


def env_name(field_name: str) -> str:
    return f"SELFLOOP_DRIFT_{field_name.upper()}"


def ngram_entropy(texts: list[str], n: int) -> float:
    """Shannon entropy (bits) of the character n-grams of ``texts`` (shorter texts count whole)."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update([t[i : i + n] for i in range(len(t) - n + 1)] if len(t) >= n else [t])
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def diversity(answers: list[str], n: int) -> dict[str, float]:
    return {"rows": len(answers), "distinct_share": len(set(answers)) / len(answers) if answers else 0.0, "ngram_entropy": ngram_entropy(answers, n)}


class DriftMonitor:
    """The observer. Register an instance as a plugin (the module does, with defaults)."""

    def __init__(self, settings: DriftSettings | None = None):
        self.fixed = settings
        self.settings = settings or DriftSettings()

    # -- what it measures ------------------------------------------------------------------
    def measure_acquired(self, ctx, round_: int) -> dict[str, Any] | None:
        from selfloop.data import load

        rd = ctx.run_dir
        if round_ < 1 or not rd.is_complete(round_, "acquire"):
            return None
        rd.verify(round_, "acquire")
        data = load(rd.stage_dir(round_, "acquire") / "data")
        if not len(data):  # nothing acquired (e.g. an exhausted pool): no diversity to measure
            return None
        levels = Counter(int(d) for d in data["difficulty"])
        return {**diversity(list(data["answer"]), self.settings.ngram), "difficulties": {str(k): levels[k] for k in sorted(levels)}}

    def measure_loss(self, ctx, round_: int) -> float | None:
        from selfloop.data import load

        rd = ctx.run_dir
        if not self.settings.loss_rows or not rd.is_complete(round_, "optimize") or rd.stage_metrics(round_, "optimize").get("starved") or not rd.is_complete(0, "acquire"):
            return None
        rd.verify(0, "acquire")
        boot = load(rd.stage_dir(0, "acquire") / "data")
        rows = sorted(random.Random(f"{ctx.seed}:drift").sample(range(len(boot)), min(self.settings.loss_rows, len(boot))))
        if not rows:
            return None
        model = ctx.load_model(f"round:{round_}")
        picked = boot.select(rows)
        logprobs = model.logprobs(list(picked["prompt"]), list(picked["answer"]))
        return -sum(logprobs) / len(logprobs)

    # -- the findings file -------------------------------------------------------------------
    def read(self, ctx) -> dict[int, dict[str, Any]]:
        path = ctx.run_dir.root / FILENAME
        if not path.exists():
            return {}
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {e["round"]: e for e in entries}

    def write(self, ctx, entries: dict[int, dict[str, Any]]) -> None:
        from selfloop.rundir import atomic_write_text

        atomic_write_text(ctx.run_dir.root / FILENAME, "".join(json.dumps(entries[r]) + "\n" for r in sorted(entries)))

    def flags(self, entries: dict[int, dict[str, Any]], round_: int) -> list[str]:
        s, entry, out = self.settings, entries[round_], []
        base, now = (entries.get(1) or {}).get("acquired"), entry.get("acquired")
        if round_ >= 2 and base and now:
            if now["distinct_share"] < s.min_distinct_ratio * base["distinct_share"]:
                out.append(f"collapse: {now['distinct_share']:.3f} of the answers acquired in round {round_} are distinct, round 1 had "
                           f"{base['distinct_share']:.3f} (below SELFLOOP_DRIFT_MIN_DISTINCT_RATIO={s.min_distinct_ratio} of it)")
            if now["ngram_entropy"] < s.min_entropy_ratio * base["ngram_entropy"]:
                out.append(f"collapse: answer {s.ngram}-gram entropy fell to {now['ngram_entropy']:.2f} bits from {base['ngram_entropy']:.2f} in round 1 "
                           f"(below SELFLOOP_DRIFT_MIN_ENTROPY_RATIO={s.min_entropy_ratio} of it)")
        loss0, loss = (entries.get(0) or {}).get("bootstrap_loss"), entry.get("bootstrap_loss")
        if round_ >= 1 and loss0 is not None and loss is not None and loss > loss0 + s.max_loss_rise:
            out.append(f"drift: round {round_}'s candidate has loss {loss:.3f} nats/token on the bootstrap data, the bootstrap model "
                       f"{loss0:.3f} (more than SELFLOOP_DRIFT_MAX_LOSS_RISE={s.max_loss_rise} above)")
        return out

    def update(self, ctx, round_: int, **values: Any) -> None:
        entries = self.read(ctx)
        entry = entries.setdefault(round_, {"round": round_})
        entry.update(values)
        entry["flags"] = self.flags(entries, round_)
        self.write(ctx, entries)
        for flag in entry["flags"]:
            ctx.log.warning("drift: %s", flag)
        policy = self.settings.stop
        stopping = [f for f in entry["flags"] if policy == "any" or (policy == "collapse" and f.startswith("collapse"))]
        if stopping:
            ctx.request_stop(f"drift guard: {stopping[0]} (SELFLOOP_DRIFT_STOP={policy})")

    # -- observer hooks ------------------------------------------------------------------------
    @hookimpl
    def selfloop_on_run_start(self, ctx):
        self.settings = self.fixed or DriftSettings.from_env()

    @hookimpl
    def selfloop_on_stage_end(self, ctx, stage, metrics):
        round_ = metrics["round"]
        if stage == "acquire" and round_ >= 1:
            self.update(ctx, round_, acquired=self.measure_acquired(ctx, round_))
        elif stage == "optimize" and not metrics.get("starved"):
            self.update(ctx, round_, bootstrap_loss=self.measure_loss(ctx, round_))

    @hookimpl
    def selfloop_on_round_end(self, ctx, record):
        """The round's entry, completed from disk if a stage event was lost (e.g. the file
        was deleted), with the round's outcome."""
        round_ = record["round"]
        entry = self.read(ctx).get(round_, {})
        values: dict[str, Any] = {"promoted": record.get("promoted"), "level": record.get("level"), "round_end": True}
        if round_ >= 1 and entry.get("acquired") is None:
            values["acquired"] = self.measure_acquired(ctx, round_)
        if "bootstrap_loss" not in entry:
            values["bootstrap_loss"] = self.measure_loss(ctx, round_)
        self.update(ctx, round_, **values)


_monitor = DriftMonitor()


@hookimpl
def selfloop_on_run_start(ctx):
    _monitor.selfloop_on_run_start(ctx)


@hookimpl
def selfloop_on_stage_end(ctx, stage, metrics):
    _monitor.selfloop_on_stage_end(ctx, stage, metrics)


@hookimpl
def selfloop_on_round_end(ctx, record):
    _monitor.selfloop_on_round_end(ctx, record)
