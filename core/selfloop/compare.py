"""``selfloop compare RUN_DIR... | SWEEP_DIR [--out DIR]``: several runs side by side
(docs/compare.md).

Reads what runs write for their reports: ``metrics.jsonl`` (or, when it is missing, the
promote stages' round records), ``run.json`` (status) and ``.hydra/config.yaml`` /
``overrides.yaml`` (task, labels). It never writes into a run directory and imports no
torch, so it is quick on a sweep that is still running.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfloop.errors import RunDirError, SelfloopError
from selfloop.registry import KINDS, SINGLE_CHOICE
from selfloop.report import accuracy_by_level, labelled_levels
from selfloop.rundir import RunDir, atomic_write_bytes, atomic_write_text

MARKER = ".selfloop-comparison"  # marks a directory that compare wrote: only such a one is written again
DEFAULT_DIR = "comparison"
RUN_FILES = ("run.json", "metrics.jsonl", ".hydra/config.yaml")
LIVE = ("starting", "running")
FINISHED = ("completed", "budget_exhausted", "unknown")  # drawn solid; LIVE dashed; the rest (stopped early) dotted
COUNTERS = ("generated_sequences", "generated_tokens", "train_steps", "train_tokens")
PLOTS = {"frontier": "frontier.png", "compute": "frontier_compute.png", "precision": "precision.png"}
HEADERS = ("run", "status", "rounds", "frontier", "peak", "precision (kept)", "labels", "wall time",
           "gen. sequences", "gen. tokens", "train steps", "best accuracy by level")
_MISSING = object()


# -- one run ---------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    status: str = "unknown"
    notes: list[str] = field(default_factory=list)
    task: str = "?"
    task_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None  # why the run is skipped (a corrupt file)
    label: str = ""
    setting: str = ""  # the label without the seed: runs that differ only by seed share it
    group: str = ""

    def frontiers(self) -> list[tuple[int | None, bool]]:
        return [record_frontier(r) for r in self.records]

    def summary(self) -> dict[str, Any]:
        recs = self.records
        frontiers = self.frontiers()
        best: dict[int, float] = {}
        for r in recs:
            for level, acc in accuracy_by_level(r).items():
                best[level] = max(best.get(level, acc), acc)
        computes = [r.get("compute") for r in recs]
        known = bool(recs) and all(isinstance(c, dict) for c in computes)
        out: dict[str, Any] = {
            "rounds": recs[-1]["round"] if recs else None,
            "final_frontier": frontiers[-1][0] if recs else None,
            "frontier_known": frontiers[-1][1] if recs else False,
            "peak_frontier": max((f for f, _ in frontiers if f is not None), default=None),
            "precision_kept": kept_precision(recs),
            "labels_used": sum(r.get("labels_used") or 0 for r in recs) if recs else None,
            "seconds": round(sum(c.get("seconds", 0) for c in computes), 2) if known else None,
            "best_accuracy": dict(sorted(best.items())),
        }
        for key in COUNTERS:  # a counter that did not move is omitted from a record: 0
            out[key] = sum(int(c.get(key, 0)) for c in computes) if known else None
        return out

    def series(self) -> dict[str, list]:
        """Per finished round: frontier (0: ground truth measured but no level >= 0.90; NaN:
        unknown), label precision of kept rows, cumulative minutes and generated tokens."""
        out: dict[str, list] = {"round": [], "frontier": [], "precision": [], "minutes": [], "tokens": []}
        minutes = tokens = 0.0
        for r, (f, known) in zip(self.records, self.frontiers()):
            compute = r.get("compute")
            if isinstance(compute, dict) and not math.isnan(minutes):
                minutes += compute.get("seconds", 0) / 60
                tokens += compute.get("generated_tokens", 0)
            else:
                minutes = tokens = math.nan  # unknown from here on
            precision = r.get("label_precision_kept") if r["round"] > 0 else None
            out["round"].append(r["round"])
            out["frontier"].append(float(f) if f is not None else (0.0 if known else math.nan))
            out["precision"].append(math.nan if precision is None else precision)
            out["minutes"].append(minutes)
            out["tokens"].append(tokens)
        return out


def record_frontier(record: dict[str, Any]) -> tuple[int | None, bool]:
    """(frontier, whether ground truth was measured); older records lack ``frontier``:
    computed from ``meta`` as the loop does."""
    known = bool(accuracy_by_level(record))
    if "frontier" in record:
        return record["frontier"], known
    if not known:
        return None, False
    from selfloop.loop import frontier  # only for old records: the loop's own definition

    return frontier(record.get("meta") or {}), True


def kept_precision(records: list[dict[str, Any]]) -> float | None:
    """Share of all self-labelled rows kept over the run whose label is right (rounds >= 1,
    weighted by rows kept)."""
    right = total = 0.0
    for r in records:
        p = r.get("label_precision_kept")
        if r.get("round", 0) > 0 and p is not None:
            weight = r.get("kept", 1) or 0
            right, total = right + p * weight, total + weight
    return right / total if total else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and not (path / MARKER).exists() and any((path / f).exists() for f in RUN_FILES)


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run directories given, and those inside given sweep directories (``multirun/<time>/<job>``;
    also ``multirun/`` itself, two levels down)."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise SelfloopError(f"{path} does not exist; expected a run directory or a sweep directory (multirun/<time>)")
        if not path.is_dir():
            raise SelfloopError(f"{path} is not a directory; expected a run directory or a sweep directory (multirun/<time>)")
        jobs = [path] if is_run_dir(path) else _jobs(path, depth=2)
        if not jobs:
            sweep = " (it has multirun.yaml: a sweep whose jobs have not started, or failed before writing)" if (path / "multirun.yaml").exists() else ""
            raise SelfloopError(f"no selfloop runs in {path}{sweep}: expected run directories (with run.json or metrics.jsonl) "
                                f"or a sweep directory holding them (multirun/<time>/0, 1, ...)")
        found += jobs
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _jobs(folder: Path, depth: int) -> list[Path]:
    children = sorted((c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")),
                      key=lambda c: (not c.name.isdigit(), int(c.name) if c.name.isdigit() else 0, c.name))
    out = []
    for child in children:
        if is_run_dir(child):
            out.append(child)
        elif depth > 1 and not (child / MARKER).exists():
            out += _jobs(child, depth - 1)
    return out


def load_run(path: Path) -> Run:
    run = Run(path=path)
    info: dict[str, Any] = {}
    try:
        info = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        run.notes.append("no run.json: status unknown")
    except json.JSONDecodeError as exc:
        run.notes.append(f"{path / 'run.json'} is corrupt ({exc}): status unknown")
    run.status = str(info.get("status") or "unknown")
    if info.get("error"):
        run.notes.append(f"error: {info['error']}")
    if info.get("stop_reason"):
        run.notes.append(f"stopped: {info['stop_reason']}")
    if run.status in LIVE and _lock_held(path / "run.lock") is False:
        run.notes.append(f"run.json says {run.status!r} but no process holds its run.lock: it was probably killed "
                         f"(continue it with `selfloop resume {path}`)")
        run.status = "killed?"
    run.config = _read_yaml(path / ".hydra" / "config.yaml", run)
    if isinstance(run.config, dict) and isinstance(run.config.get("task"), dict) and run.config["task"]:
        run.task, options = next(iter(run.config["task"].items()))
        run.task_options = options if isinstance(options, dict) else {}
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml", run)
    run.overrides = parse_overrides(overrides if isinstance(overrides, list) else [])
    try:
        run.records = read_records(path)
    except SelfloopError as exc:
        run.problem = str(exc)
    return run


def read_records(path: Path) -> list[dict[str, Any]]:
    """Round records from metrics.jsonl; from round-NNN/promote when metrics.jsonl is missing
    (deleted, or a run from before it existed). A corrupt line is one error naming file and line."""
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        try:
            return RunDir(path).records()
        except RunDirError as exc:
            raise SelfloopError(f"no metrics.jsonl, and {exc}") from None
    records = []
    for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SelfloopError(f"{metrics}:{number} is corrupt: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise SelfloopError(f"{metrics}:{number} is not a round record (no integer 'round'): {line[:80]}")
        records.append(record)
    return sorted(records, key=lambda r: r["round"])


def _read_yaml(path: Path, run: Run) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except yaml.YAMLError as exc:
        run.notes.append(f"{path} is corrupt ({str(exc).splitlines()[0]}): not used for labels or the task")
        return None


def _lock_held(lock: Path) -> bool | None:
    """Whether a process holds ``run.lock`` (Linux: /proc/locks, read only; taking the lock to
    test it could make a starting ``selfloop resume`` fail). None where it cannot be told."""
    if not lock.exists():
        return False  # a run creates it before it writes run.json
    try:
        st = lock.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        for token in line.split():
            parts = token.split(":")
            if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) == st.st_ino:
                try:
                    if (int(parts[0], 16), int(parts[1], 16)) == (os.major(st.st_dev), os.minor(st.st_dev)):
                        return True
                except ValueError:
                    continue
    return False


# -- labels: the settings that differ between runs ------------------------------------------
def parse_overrides(items: list[Any]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if key.startswith("~"):
            out[key] = "deleted"
        elif not key.lstrip("+").startswith("hydra."):
            out[key.lstrip("+")] = value.strip() if sep else ""
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _lookup(config: dict[str, Any] | None, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def setting_value(run: Run, key: str) -> str:
    """A setting's value in a run: from its saved config where it is there (so `seed=1` and a
    default seed 1 agree), else the override as written, else ``(default)``."""
    node = _lookup(run.config, key)
    if key in KINDS and key not in SINGLE_CHOICE and node is None:
        return "[]"  # an empty chain (`filter=[]`) is saved as null
    if key in KINDS and isinstance(node, dict):
        names = list(node)
        return names[0] if key in SINGLE_CHOICE and len(names) == 1 else "[" + ",".join(names) + "]"
    if node is not _MISSING and not isinstance(node, dict):
        return _text(node)
    if key in run.overrides:
        value = run.overrides[key]
        return "[" + ",".join(v.strip() for v in value[1:-1].split(",")) + "]" if value.startswith("[") and value.endswith("]") else value
    return "(default)"


def differing_keys(runs: list[Run]) -> list[str]:
    """Overrides whose values differ across runs; where none do, the saved configs' differences."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    differ = [k for k in keys if len({setting_value(r, k) for r in runs}) > 1]
    if differ or len(runs) < 2 or not all(r.config for r in runs):
        return differ
    differ = [k for k in KINDS if len({setting_value(r, k) for r in runs}) > 1]
    flat = list(dict.fromkeys(k for r in runs for k in _flatten(r.config or {})))
    for key in flat:
        head, _, rest = key.partition(".")
        # options of a strategy some runs do not select are explained by the selection
        if head in KINDS and not all(isinstance(_lookup(r.config, f"{head}.{rest.split('.')[0]}"), dict) for r in runs):
            continue
        if len({_text(_lookup(r.config, key)) if _lookup(r.config, key) is not _MISSING else "(absent)" for r in runs}) > 1:
            differ.append(key)
    return differ


def _flatten(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def assign_labels(runs: list[Run]) -> None:
    keys = differing_keys(runs)
    parents = [str(r.path.resolve().parent) for r in runs]
    root = os.path.commonpath(parents) if parents else ""
    for r in runs:  # a setting left at its default is not named: the label says what was set
        values = {k: setting_value(r, k) for k in keys}
        r.label = " ".join(f"{k}={v}" for k, v in values.items() if v != "(default)") or ("(defaults)" if keys else os.path.relpath(r.path.resolve(), root))
        r.setting = " ".join(f"{k}={v}" for k, v in values.items() if v != "(default)" and k != "seed")
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:  # the same settings twice: tell them apart by directory
        if seen[r.label] > 1:
            r.label = f"{r.label} [{os.path.relpath(r.path.resolve(), root)}]"


# -- the comparison ------------------------------------------------------------------------
@dataclass
class Group:
    title: str
    task: str
    runs: list[Run]

    def seed_settings(self) -> dict[str, list[Run]]:
        """Runs by setting when some settings were run with several seeds (else empty)."""
        by: dict[str, list[Run]] = {}
        for r in self.runs:
            by.setdefault(r.setting, []).append(r)
        return by if any(len(v) > 1 for v in by.values()) and len(by) < len(self.runs) else {}


@dataclass
class Comparison:
    runs: list[Run]  # every run found, skipped ones included (with .problem)
    groups: list[Group]  # the runs compared, by task
    notes: list[str]
    out_dir: Path
    files: list[Path] = field(default_factory=list)

    @property
    def skipped(self) -> list[Run]:
        return [r for r in self.runs if r.problem]

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": [{"title": g.title, "task": g.task, "runs": [r.label for r in g.runs], "tracking": tracking(g)} for g in self.groups],
            "notes": self.notes,
            "runs": [
                {"label": r.label, "path": str(r.path), "status": r.status, "task": r.task, "group": r.group,
                 "overrides": r.overrides, "notes": r.notes, "problem": r.problem,
                 **({} if r.problem else {"summary": _json_keys(r.summary()), "series": r.series()})}
                for r in self.runs
            ],
        }


def _json_keys(summary: dict[str, Any]) -> dict[str, Any]:
    return {**summary, "best_accuracy": {str(k): v for k, v in summary["best_accuracy"].items()}}


def group_by_task(runs: list[Run]) -> tuple[list[Group], list[str]]:
    """Runs of different tasks (or the same task with different options, e.g. another data file)
    are compared only within their task: levels, frontier and accuracy do not line up across."""
    by: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by.setdefault((r.task, json.dumps(r.task_options, sort_keys=True, default=str)), []).append(r)
    names = [task for task, _ in by]
    groups = []
    for (task, options), members in by.items():
        title = task if task != "?" else "unknown task (no .hydra/config.yaml)"
        if names.count(task) > 1:
            others = [json.loads(o) for t, o in by if t == task and o != options]
            mine = json.loads(options)
            diff = [k for k in mine if any(o.get(k) != mine[k] for o in others)] or list(mine)
            title = f"{task} ({', '.join(f'{k}={_text(mine[k])}' for k in diff) or 'no options'})"
        for r in members:
            r.group = title
        groups.append(Group(title, task, members))
    notes = []
    if len(groups) > 1:
        notes.append(
            "These runs are of different tasks: " + "; ".join(f"{g.title} ({len(g.runs)} run{'s' * (len(g.runs) > 1)})" for g in groups)
            + ". Each is compared only with runs of its own task (its own table and row of plots): difficulty levels, "
            "and so the frontier and accuracy by level, mean different things on different tasks (or task options)."
        )
    return groups, notes


def output_dir(given: list[Path], runs: list[Path], out: str | os.PathLike | None) -> Path:
    """``--out``, else ``<common parent>/comparison``: the sweep directory itself for a sweep,
    the runs' parent for run directories. Never a run's directory, nor a foreign directory."""
    if out is not None:
        target = Path(out)
    else:
        bases = [str((p if not is_run_dir(p) else p.parent).resolve()) for p in given]
        target = Path(os.path.commonpath(bases)) / DEFAULT_DIR
    resolved = target.resolve()
    inside = next((p for p in (resolved, *resolved.parents) if p in {r.resolve() for r in runs} or is_run_dir(p)), None)
    if inside is not None:
        raise SelfloopError(f"{target} is inside the run directory {inside}: compare never writes into a run; choose another --out")
    if target.exists():
        if not target.is_dir():
            raise SelfloopError(f"{target} exists and is not a directory; choose another --out")
        if any(target.iterdir()) and not (target / MARKER).exists():
            raise SelfloopError(f"{target} exists and is not a comparison written by selfloop compare (no {MARKER}); "
                                f"nothing was written: choose another --out, or remove it")
    return target


def compare(paths: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Comparison:
    """Read the runs in ``paths`` (run or sweep directories) and write comparison.md, .csv,
    .json and the plots into ``out_dir`` (default ``<common parent>/comparison``)."""
    if not paths:
        raise SelfloopError("no runs given: selfloop compare RUN_DIR... | SWEEP_DIR [--out DIR]")
    given = [Path(p) for p in paths]
    found = find_runs(paths)
    target = output_dir(given, found, out_dir)  # checked before anything is read at length or written
    runs = [load_run(p) for p in found]
    readable = [r for r in runs if not r.problem]
    if not readable:
        raise SelfloopError("nothing to compare, every run was skipped: " + "; ".join(str(r.problem) for r in runs))
    assign_labels(runs)
    groups, notes = group_by_task(readable)
    notes += [f"skipped {r.path}: {r.problem}" for r in runs if r.problem]
    if not any(r.records for r in readable):
        notes.append("no run has finished a round yet: the table lists them; the plots are empty")
    comparison = Comparison(runs=runs, groups=groups, notes=notes, out_dir=target)
    write(comparison)
    return comparison


# -- outputs ---------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def table_rows(group: Group) -> list[list[str]]:
    """One row per run; accuracy shows the highest labelled level and every level above it."""
    labelled = labelled_levels([rec for r in group.runs for rec in r.records]) or {0}
    rows = []
    for r in group.runs:
        s = r.summary()
        frontier = s["final_frontier"] if s["final_frontier"] is not None else ("none" if s["frontier_known"] else None)
        acc = " ".join(f"{k}:{v:.2f}" for k, v in s["best_accuracy"].items() if k not in labelled or k == max(labelled))
        rows.append([
            r.label, r.status, "none finished" if s["rounds"] is None else str(s["rounds"]), _fmt(frontier), _fmt(s["peak_frontier"]),
            _fmt(s["precision_kept"]), _fmt(s["labels_used"]), _duration(s["seconds"]), _count(s["generated_sequences"]),
            _count(s["generated_tokens"]), _count(s["train_steps"]), acc or "–",
        ])
    return rows


def seed_rows(group: Group) -> list[list[str]]:
    rows = []
    for setting, runs in group.seed_settings().items():
        done = [r.summary() for r in runs if r.records]
        frontiers = [float(s["final_frontier"] or 0) for s in done if s["frontier_known"]]
        precisions = [s["precision_kept"] for s in done if s["precision_kept"] is not None]
        spread = f"{statistics.mean(frontiers):.1f} ± {statistics.stdev(frontiers):.1f}" if len(frontiers) > 1 else _fmt(frontiers[0] if frontiers else None, 1)
        rows.append([
            setting or "(all runs)", f"{len(done)} of {len(runs)}", spread,
            f"{min(frontiers):g}–{max(frontiers):g}" if frontiers else "–",
            _fmt(statistics.mean(precisions) if precisions else None),
            _fmt(statistics.mean(s["labels_used"] for s in done) if done else None, 0),
        ])
    return rows


TRACKING_HEADERS = ("evaluator", "candidates", "runs", "Spearman rho", "rho by run (median, min–max)")
TRACKING_MIN = 4  # fewer candidates than this: no correlation is reported


def candidate_truth(record: dict[str, Any]) -> float | None:
    """Ground-truth accuracy of a round's candidate on the levels its promotion gate weighed
    (levels <= the curriculum level; every measured level when the record has none)."""
    for by_level in (record.get("candidate_meta") or {}).values():
        level = record.get("level")
        levels = [k for k in by_level if level is None or int(k) <= level]
        if levels:
            return sum(by_level[k] for k in levels) / len(levels)
    return None


def tracking_points(runs: list[Run]) -> dict[str, list[tuple[str, float, float]]]:
    """Per label-free evaluator in the gate: (run label, candidate's gate score, candidate's
    ground truth) for every candidate trained after the bootstrap, promoted or rejected."""
    points: dict[str, list[tuple[str, float, float]]] = {}
    for r in runs:
        for rec in r.records:
            truth = candidate_truth(rec) if rec.get("round", 0) > 0 else None
            if truth is None:
                continue
            for name, scores in (rec.get("gate") or {}).items():
                points.setdefault(name, []).append((r.label, float(scores["candidate"]), truth))
    return points


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation; None below TRACKING_MIN points or when either side is constant."""
    if len(xs) < TRACKING_MIN or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr  # scipy comes with scikit-learn; no torch

    return float(spearmanr(xs, ys).statistic)


def tracking(group: Group) -> list[dict[str, Any]]:
    """Does each gate evaluator rank candidates like ground truth? Pooled over the group's
    runs, and per run (a run's own candidates) to show how stable that is."""
    out = []
    for name, pts in sorted(tracking_points(group.runs).items()):
        per_run = {}
        for label in dict.fromkeys(p[0] for p in pts):
            mine = [p for p in pts if p[0] == label]
            per_run[label] = spearman([p[1] for p in mine], [p[2] for p in mine])
        out.append({"evaluator": name, "candidates": len(pts), "runs": len(per_run),
                    "spearman": spearman([p[1] for p in pts], [p[2] for p in pts]), "by_run": per_run})
    return out


def tracking_rows(group: Group) -> list[list[str]]:
    rows = []
    for t in tracking(group):
        known = sorted(v for v in t["by_run"].values() if v is not None)
        spread = f"{statistics.median(known):.2f} ({known[0]:.2f}–{known[-1]:.2f}), {len(known)} runs" if known else "–"
        rows.append([t["evaluator"], str(t["candidates"]), str(t["runs"]), _fmt(t["spearman"]), spread])
    return rows


SEED_HEADERS = ("setting", "runs with rounds", "final frontier mean ± sd", "min–max", "precision (kept) mean", "labels mean")


def _md_table(headers: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    def cell(x: str) -> str:
        return x.replace("|", "\\|")

    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


def markdown(comparison: Comparison) -> str:
    c = comparison
    lines = [
        "# selfloop comparison", "",
        f"{sum(len(g.runs) for g in c.groups)} runs compared" + (f", {len(c.skipped)} skipped" if c.skipped else "")
        + ". Runs are labelled by the settings that differ between them. "
        "frontier: the highest level at which ground-truth exact match is >= 0.90 after the last finished round "
        "(none: no level; –: no ground truth measured); peak: its highest value in any round. "
        "precision (kept): share of the self-labelled rows kept by the filters whose label is right (all rounds after the bootstrap). "
        "labels: references trained on. wall time and the counters: summed over finished rounds. "
        "Accuracy and precision are ground truth, measured for reports only (meta-evaluation). See docs/compare.md.",
    ]
    if c.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in c.notes]]
    for g in c.groups:
        lines += ["", f"## {g.title}", "", *_md_table(HEADERS, table_rows(g))]
        if g.seed_settings():
            lines += ["", "Across seeds (runs whose settings differ only by `seed`):", "", *_md_table(SEED_HEADERS, seed_rows(g))]
        tracked = tracking_rows(g)
        if tracked:
            lines += ["", "Does the label-free gate track the truth? For every candidate trained after the bootstrap (promoted or "
                      "rejected), each gate evaluator's candidate score against the candidate's ground-truth accuracy on the "
                      f"levels the gate weighed; Spearman's rho over all of them (– below {TRACKING_MIN} candidates or when a side "
                      "is constant), and per run:", "", *_md_table(TRACKING_HEADERS, tracked)]
    run_notes = [f"- {r.label} ({r.path}): {'; '.join(r.notes)}" for r in c.runs if r.notes and not r.problem]
    if run_notes:
        lines += ["", "## Run notes", "", *run_notes]
    lines += ["", "## Plots", "",
              "Frontier per round, and against cumulative compute (minutes spent in stages; generated tokens); "
              "label precision of kept rows per round. Dashed: still running; dotted: failed, interrupted, stopped early or killed. "
              "Frontier lines are offset by up to ±0.15 so that runs on top of each other stay visible.", ""]
    lines += [f"![{kind}]({name})" for kind, name in PLOTS.items()]
    lines += ["", "## Runs", "", *[f"- `{r.label}`: {r.path} ({r.status})" for r in c.runs], ""]
    return "\n".join(lines)


CSV_FIELDS = ("group", "label", "status", "rounds", "final_frontier", "frontier_known", "peak_frontier", "precision_kept",
              "labels_used", "seconds", *COUNTERS, "path", "problem", "notes")


def csv_text(comparison: Comparison) -> str:
    levels = sorted({lvl for r in comparison.runs if not r.problem for lvl in r.summary()["best_accuracy"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*CSV_FIELDS, *(f"best_accuracy_{lvl}" for lvl in levels)])
    for r in comparison.runs:
        s = {} if r.problem else r.summary()
        row = {**s, "group": r.group, "label": r.label, "status": r.status, "path": str(r.path), "problem": r.problem or "",
               "notes": "; ".join(r.notes)}
        writer.writerow([("" if row.get(f) is None else row.get(f, "")) for f in CSV_FIELDS]
                        + [s.get("best_accuracy", {}).get(lvl, "") for lvl in levels])
    return buffer.getvalue()


def _style(status: str) -> str:
    return "-" if status in FINISHED else ("--" if status in LIVE else ":")


def plot(comparison: Comparison, kind: str, path: Path) -> Path:
    """One row of axes per task group: frontier vs round, frontier vs compute (two panels),
    or label precision of kept rows vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = {"frontier": [("round", "frontier")], "compute": [("minutes", "frontier"), ("tokens", "frontier")],
              "precision": [("round", "precision")]}[kind]
    xlabels = {"round": "round", "minutes": "cumulative minutes in stages", "tokens": "cumulative generated tokens"}
    groups = comparison.groups
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(7 * len(panels) + 4, 4 * len(groups)), squeeze=False)
    for row, group in enumerate(groups):
        plotted = [r for r in group.runs if r.records]
        settings = group.seed_settings()
        settings = settings if len(settings) > 1 else {}  # one setting: a colour per seed says more
        keys = list(settings) if settings else [r.label for r in plotted]
        palette = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20" if len(keys) <= 20 else "viridis")
        colors = [palette(i if len(keys) <= 20 else i / (len(keys) - 1)) for i in range(len(keys))]
        for col, (xkey, ykey) in enumerate(panels):
            ax = axes[row][col]
            legend_done: set[str] = set()
            shown, undrawn = 0, []
            for i, r in enumerate(plotted):
                s = r.series()
                xs, ys = s[xkey], s[ykey]
                if ykey == "frontier" and len(plotted) > 1:  # keep overlapping runs visible
                    ys = [y + 0.3 * (i / (len(plotted) - 1) - 0.5) for y in ys]
                pairs = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
                if not pairs:
                    undrawn.append(r.label)
                    continue
                key = r.setting if settings else r.label
                name = (key or "(all runs)") if settings else key + ("" if r.status in FINISHED else f" ({r.status})")
                ax.plot(*zip(*pairs), _style(r.status), marker="o", ms=3, lw=1.3, alpha=0.85, color=colors[keys.index(key)],
                        drawstyle="steps-post" if ykey == "frontier" and xkey != "round" else "default",
                        label=name if key not in legend_done else "_nolegend_")
                legend_done.add(key)
                shown += 1
            what = {"frontier": "frontier (highest level >= 0.90)", "precision": "label precision of kept rows"}[ykey]
            ax.set(title=f"{group.title}: {what}", xlabel=xlabels[xkey], ylabel=what)
            if xkey == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ykey == "precision":
                ax.set_ylim(-0.02, 1.02)
            else:  # levels are integers; 0: no level mastered
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_ylim(bottom=-0.5)
            ax.grid(alpha=0.3)
            if not shown:
                measured = any(not math.isnan(y) for r in plotted for y in r.series()[ykey])
                why = "no finished round" if not plotted else "compute not recorded (older runs)" if measured else "no ground truth measured"
                ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="gray")
                continue
            if xkey != "round":  # compute from zero
                ax.set_xlim(0, ax.dataLim.x1 * 1.05)
            if undrawn:
                more = f" and {len(undrawn) - 3} more" if len(undrawn) > 3 else ""
                ax.text(0.99, 0.02, f"no data here for: {', '.join(undrawn[:3])}{more}", transform=ax.transAxes, ha="right", va="bottom",
                        fontsize=7, color="gray")
            handles, labels = ax.get_legend_handles_labels()
            statuses = {_style(r.status) for r in plotted}
            extra = [Line2D([], [], ls=ls, color="gray", label=text) for ls, text in (("--", "running"), (":", "stopped early, failed or killed")) if ls in statuses]
            if settings or len(statuses) > 1:
                handles += extra
                labels += [h.get_label() for h in extra]
            ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(wspace=0.5 if len(panels) > 1 else 0.2, hspace=0.45)  # room for the legends at the right
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # the outer legends included
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _no_nan(x: Any) -> Any:
    """NaN (unknown) as null: JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def write(comparison: Comparison) -> None:
    out = comparison.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MARKER, "written by `selfloop compare`; it may write here again\n")
        files = [out / "comparison.md", out / "comparison.csv", out / "comparison.json"]
        atomic_write_text(files[0], markdown(comparison))
        atomic_write_text(files[1], csv_text(comparison))
        atomic_write_text(files[2], json.dumps(_no_nan(comparison.to_json()), indent=2, default=str) + "\n")
        files += [plot(comparison, kind, out / name) for kind, name in PLOTS.items()]
    except OSError as exc:
        raise SelfloopError(f"cannot write the comparison into {out}: {exc}; choose another --out") from None
    comparison.files = files


def print_tables(comparison: Comparison) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from selfloop.report import print_wide

    def table(title: str, headers: tuple[str, ...], rows: list[list[str]]) -> None:
        t = Table(title=escape(title))
        for h in headers:
            t.add_column(h, overflow="fold")
        for row in rows:
            t.add_row(*map(Text, row))  # labels such as filter=[a,b] are not markup
        print_wide(t, fallback=160)

    for g in comparison.groups:
        table(f"selfloop compare: {g.title}", HEADERS, table_rows(g))
        if g.seed_settings():
            table(f"{g.title}: across seeds", SEED_HEADERS, seed_rows(g))
        tracked = tracking_rows(g)
        if tracked:
            table(f"{g.title}: does the label-free gate track the truth?", TRACKING_HEADERS, tracked)
    for note in comparison.notes:
        print(f"note: {note}")


def cmd_compare(paths: list[str], out: str | None = None) -> int:
    comparison = compare(paths, out)
    print_tables(comparison)
    print(f"wrote {comparison.out_dir}: " + ", ".join(p.name for p in comparison.files))
    return 0
