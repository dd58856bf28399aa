"""The report: a per-round table (report.md, the terminal) and curves.png, rebuilt from
``metrics.jsonl`` (and ``run.json``'s warnings and status) so ``selfloop report RUN_DIR`` can
redraw any run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from selfloop.rundir import atomic_write_bytes, atomic_write_text, read_metrics_jsonl

HEADERS = ("round", "level", "labels", "kept", "precision", "autonomous", "promoted", "frontier", "accuracy by level")


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def accuracy_by_level(record: dict[str, Any]) -> dict[int, float]:
    """The first reference-using evaluator's per-level scores of the incumbent after the round."""
    for by_level in record.get("meta", {}).values():
        if by_level:
            return {int(k): v for k, v in by_level.items()}
    return {}


def labelled_levels(records: list[dict[str, Any]]) -> set[int]:
    return {lvl for r in records for lvl in r.get("labelled_levels", [])}


def has_meta(records: list[dict[str, Any]]) -> bool:
    return any(accuracy_by_level(r) for r in records)


def outcome(record: dict[str, Any]) -> str:
    if record.get("starved"):
        return "starved"
    return "yes" if record["promoted"] else "no"


def rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One table row per round; accuracy shows the highest labelled level and all above it."""
    labelled = labelled_levels(records) or {0}
    out = []
    for r in records:
        acc = accuracy_by_level(r)
        autonomous = " ".join(f"{v:.3f}" for v in r.get("autonomous", {}).values())
        out.append(
            [
                str(r["round"]),
                "bootstrap" if r["round"] == 0 else _fmt(r["level"]),
                str(r["labels_used"]),
                f"{r['kept']}/{r['acquired']}",
                _fmt(r.get("label_precision_kept")),
                autonomous or "–",
                outcome(r),
                _fmt(r.get("frontier")),
                " ".join(f"{k}:{v:.2f}" for k, v in sorted(acc.items()) if k not in labelled or k == max(labelled)) or "–",
            ]
        )
    return out


def funnel_lines(records: list[dict[str, Any]]) -> list[str]:
    """Rows in and out of each filter per round, with the label precision of what each kept
    and dropped (meta-evaluation: how much a filter contributes)."""
    out = []
    for r in records:
        steps = r.get("funnel") or []
        if not steps:
            continue
        parts = []
        for s in steps:
            prec = ""
            if s.get("precision_kept") is not None or s.get("precision_dropped") is not None:
                prec = f" (precision kept {_fmt(s.get('precision_kept'))}, dropped {_fmt(s.get('precision_dropped'))})"
            parts.append(f"{s['filter']} {s['kept']}/{s['of']}{prec}")
        out.append(f"- round {r['round']}: {r['acquired']} acquired → " + " → ".join(parts))
    return out


def last_evaluation(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluate stage's results of the last round that evaluated a candidate."""
    for r in reversed(records):
        path = run_dir / f"round-{r['round']:03d}" / "evaluate" / "metrics.json"
        try:
            evaluators = json.loads(path.read_text()).get("evaluators") or {}
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if evaluators:
            return evaluators
    return {}


def trust_lines(evaluation: dict[str, Any]) -> list[str]:
    """Meta-evaluation of the evaluators (from an evaluator such as ``meta`` that reports
    ``evaluators: {name: {trusted, spearman, ...}}``): can each autonomous signal be trusted?"""
    out = []
    for judge, result in evaluation.items():
        table = result.get("evaluators")
        if not isinstance(table, dict) or not any(isinstance(v, dict) and "trusted" in v for v in table.values()):
            continue
        out += [f"From `{judge}` (ground truth, report only):", "",
                "| evaluator | trusted | Spearman (candidates) | kappa with truth | precision kept | kept share | calibration error |",
                "|---|---|---|---|---|---|---|"]
        for name, e in table.items():
            trusted = {True: "yes", False: "no"}.get(e.get("trusted"), "unknown")
            rho = f"{_fmt(e.get('spearman'))} ({e.get('candidates', '–')})"
            out.append(f"| {name} | {trusted} | {rho} | {_fmt(e.get('kappa_with_truth'))} | {_fmt(e.get('precision_kept'))} | "
                       f"{_fmt(e.get('kept_share'))} | {_fmt(e.get('calibration_error'))} |")
        agreement = result.get("agreement") or {}
        if agreement.get("krippendorff_alpha") is not None:
            out += ["", f"Agreement among evaluators: Krippendorff's alpha {_fmt(agreement['krippendorff_alpha'])}; pairwise kappa "
                    + ", ".join(f"{pair.replace('|', ' / ')} {_fmt(k)}" for pair, k in (agreement.get("pairwise_kappa") or {}).items())]
        out.append("")
    return out


def dimension_lines(evaluation: dict[str, Any]) -> list[str]:
    """Evaluators that report several dimensions (``by_dimension``), each shown separately."""
    out = []
    for name, result in evaluation.items():
        dims = result.get("by_dimension")
        if isinstance(dims, dict) and dims:
            weights = result.get("weights") or {}
            out.append(f"- {name}: " + ", ".join(f"{d} {_fmt(_mean(v))}" + (f" (weight {_fmt(weights[d])})" if d in weights else "") for d, v in dims.items()))
    return out


def _mean(value: Any) -> Any:
    if isinstance(value, dict) and value:
        return sum(value.values()) / len(value)
    return value


def guard_lines(run_dir: Path) -> list[str]:
    """What guard observers found (the drift monitor's ``drift.jsonl``)."""
    path = run_dir / "drift.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        for flag in entry.get("flags") or []:
            out.append(f"- round {entry.get('round')}: drift monitor: {flag}")
    return out or ["- drift monitor: no collapse or drift flagged"]


def markdown(records: list[dict[str, Any]], title: str, info: dict[str, Any] | None = None, run_dir: Path | None = None) -> str:
    info = info or {}
    total_labels = sum(r["labels_used"] for r in records)
    labelled = sorted(labelled_levels(records))
    names = ", ".join(records[-1].get("autonomous", {})) if records else ""
    lines = [f"# {title}", ""]
    status = info.get("status")
    if status:
        lines += [f"Status: **{status}**" + (f" — {info['stop_reason']}" if info.get("stop_reason") else ""), ""]
    lines += [
        f"Labels used: **{total_labels}** in all (levels {labelled or 'none'}); every other row was labelled by the model itself.",
        "kept: rows kept by the filters / rows acquired. precision: share of kept pseudo-labels that are right.",
    ]
    if has_meta(records):
        lines += [
            "Accuracy by level is ground truth, measured for this report only (meta-evaluation): it never reaches training or promotion.",
            "frontier: the highest level at which ground-truth exact match is at least 0.90.",
        ]
    else:
        lines += ["**No meta-evaluation exists for this run**: the task has no ground truth (or no reference-using evaluator ran), "
                  "so label precision and accuracy are unknown; only the autonomous signals below were measured."]
    lines += [
        f"Autonomous score ({names or 'none'}) is label-free and decides promotion. promoted: starved = the filters kept nothing "
        "(or the optimizer found nothing to learn), so nothing was trained or promoted.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(records)]
    funnel = funnel_lines(records)
    if funnel:
        lines += ["", "## Filter funnel", "", *funnel]
    reasons = [f"- round {r['round']}: {'promoted' if r['promoted'] else 'not promoted'} — {r['reason']}" for r in records if r["round"]]
    if reasons:
        lines += ["", "## Promotion decisions", "", *reasons]
    evaluation = last_evaluation(run_dir, records) if run_dir else {}
    trust = trust_lines(evaluation)
    if trust:
        lines += ["", "## Can the autonomous evaluators be trusted?", "", *trust]
    dims = dimension_lines(evaluation)
    if dims:
        lines += ["", "## Evaluation by dimension (last evaluated candidate)", "", *dims]
    guards = guard_lines(run_dir) if run_dir else []
    if guards:
        lines += ["", "## Guards", "", *guards]
    warnings = list(info.get("warnings") or []) + [f"round {r['round']}: {w}" for r in records for w in r.get("warnings", [])]
    if warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    levels = sorted({lvl for r in records for lvl in accuracy_by_level(r)})
    labelled = labelled_levels(records)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis", max(2, len(levels)))
    for i, level in enumerate(levels):
        ys = [accuracy_by_level(r).get(level) for r in records]
        style = ":" if level in labelled else "-"
        ax.plot(rounds, ys, style, marker="o", ms=3, color=cmap(i), label=f"{level}{' (labelled)' if level in labelled else ''}")
    ax.set(title="Ground-truth accuracy by difficulty (meta-evaluation)" if levels else "No ground truth: no meta-evaluation",
           xlabel="round", ylabel="exact match", ylim=(-0.02, 1.02))
    ax.set_xticks(rounds)
    if levels:
        ax.legend(title="level", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), ncol=1 + len(levels) // 16)
    ax.grid(alpha=0.3)
    later = [r for r in records if r["round"] > 0]
    if later:
        xs = [r["round"] for r in later]
        ax2.plot(xs, [r.get("label_precision_kept") for r in later], marker="o", label="pseudo-label precision (kept rows)")
        ax2.plot(xs, [r["kept_fraction"] for r in later], marker="s", label="kept fraction")
        for name in later[0].get("autonomous", {}):
            ax2.plot(xs, [r["autonomous"].get(name) for r in later], marker="^", label=f"autonomous: {name}")
        for x in [r["round"] for r in later if not r["promoted"]]:
            ax2.axvline(x, color="red", alpha=0.3)
        ax2.set_xticks(xs)
        ax2.legend(fontsize=7, loc="lower left")
    ax2.set(title="Label quality and autonomous score (red: not promoted)", xlabel="round", ylim=(-0.02, 1.02))
    ax2.grid(alpha=0.3)
    frontiers = [r.get("frontier") for r in records]
    if any(f is not None for f in frontiers):
        ax3 = ax.twinx()
        ax3.step(rounds, [f if f is not None else float("nan") for f in frontiers], where="mid", color="black", lw=1.5, alpha=0.6)
        ax3.set_ylabel("frontier (black): highest level >= 0.90", fontsize=8)
        ax3.set_ylim(0, max(levels or [1]) + 1)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # a kill never leaves a half-written PNG
    return path


def render(run_dir: str | Path, **status: Any) -> list[dict[str, Any]]:
    """Write report.md and curves.png into ``run_dir``; return the records. ``status`` and
    ``stop_reason`` override run.json's (the loop renders before it writes its final status)."""
    run_dir = Path(run_dir)
    records = read_metrics_jsonl(run_dir / "metrics.jsonl")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        info = {}
    info.update(status)
    plot(records, run_dir / "curves.png")
    atomic_write_text(run_dir / "report.md", markdown(records, f"selfloop report: {run_dir.name}", info, run_dir))
    return records


def print_table(records: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="selfloop: rounds (accuracy is ground truth, for the report only)")
    for h in HEADERS:
        table.add_column(h, overflow="fold")
    for row in rows(records):
        table.add_row(*row)
    print_wide(table)


def print_wide(table: Any, fallback: int = 150) -> None:
    """Print a rich table: at the terminal's width on a terminal; into a log file or a pipe as
    wide as the table needs (at least ``fallback``), so that no header or cell is wrapped."""
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        width = shutil.get_terminal_size((fallback, 24)).columns
    else:  # COLUMNS (often 80 when not on a terminal) would fold the table in the log
        width = max(fallback, Console(width=10_000).measure(table).maximum)
    Console(width=width).print(table)
