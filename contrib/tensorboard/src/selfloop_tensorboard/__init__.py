"""selfloop-tensorboard: log every selfloop run to TensorBoard.

An observer plugin: once installed it writes ``<run_dir>/tensorboard/`` for every run, one
global step per round. ``SELFLOOP_DISABLE_PLUGINS=tensorboard`` turns it off;
``SELFLOOP_TENSORBOARD_DIR`` moves the logs to ``$SELFLOOP_TENSORBOARD_DIR/<parent>/<run>``.

torch and tensorboard are imported inside the hooks, so discovering the plugin (``selfloop
plugins``) imports neither.

Resume: observer hooks fire only for stages that actually run, so a resumed process never
hears about the stages and rounds finished before it. At every run start the plugin therefore
re-logs them from the run directory (the source of truth, with their original wall times),
behind a purge marker at step 0 that tells TensorBoard to drop the points written by earlier
processes. Curves come out whole and single however the run was killed, and even when the
plugin was installed half-way through a run.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any, Iterator

from selfloop import hookimpl
from selfloop.rundir import MARKER, STAGE_ORDER

__version__ = "0.1.0"

ENV_DIR = "SELFLOOP_TENSORBOARD_DIR"
COMPUTE = ("seconds", "generated_sequences", "train_steps")
# Bookkeeping rather than curves: the step already is the round, and the rest never changes.
SKIP = frozenset({"round", "stage", "uses_references", "labelled_levels"})

# One writer per log directory: a Hydra sweep runs its jobs one after another in one process,
# and each job must get its own event files.
_writers: dict[Path, Any] = {}


def log_dir(run_dir: Any) -> Path:
    """Where a run's events go: ``<run_dir>/tensorboard``, or ``$SELFLOOP_TENSORBOARD_DIR/
    <parent>/<run>`` (``runs/2026-...``, or ``2026-.../3`` for a sweep job) when that is set."""
    root = Path(run_dir.root).resolve()
    base = os.environ.get(ENV_DIR)
    return Path(base).expanduser().resolve() / root.parent.name / root.name if base else root / "tensorboard"


def scalars(tree: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """Every number in nested metrics as ``(tag, value)``: keys join with ``/``, digit keys
    (difficulty levels) become ``level_<n>``, list items are named by their first string field
    (a filter's name) or else their position; bools count 0/1; strings and None are skipped."""
    if isinstance(tree, (bool, int, float)):
        yield prefix, float(tree)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            if key not in SKIP:
                yield from scalars(value, f"{prefix}/{'level_' if str(key).isdigit() else ''}{key}")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            name = next((v for v in item.values() if isinstance(v, str)), i) if isinstance(item, dict) else i
            yield from scalars(item, f"{prefix}/{name}")


def log_stage(writer: Any, round_: int, stage: str, metrics: dict, walltime: float | None = None) -> None:
    if stage == "promote":  # its metrics are the round record, logged as round/*; keep its cost
        body = {k: metrics[k] for k in COMPUTE if k in metrics}
    else:  # "level" is the curriculum level, logged once as round/level
        body = {k: v for k, v in metrics.items() if k != "level"}
    for tag, value in scalars(body, f"stage/{stage}"):
        writer.add_scalar(tag, value, round_, walltime=walltime)


def log_round(writer: Any, record: dict, walltime: float | None = None) -> None:
    # Top-level seconds/... are the promote stage's own cost; the round's is record["compute"].
    body = {k: v for k, v in record.items() if k not in COMPUTE}
    # The loop records each gate entry as [candidate, incumbent]: name the two curves.
    body["gate"] = {n: dict(zip(("candidate", "incumbent"), v)) for n, v in (record.get("gate") or {}).items()}
    for tag, value in scalars(body, "round"):
        writer.add_scalar(tag, value, record["round"], walltime=walltime)


def replay(writer: Any, run_dir: Any) -> None:
    """Re-log every finished stage and round found on disk, at the time each stage finished."""
    for path in sorted(run_dir.root.glob("round-*")):
        try:
            round_ = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        for stage in STAGE_ORDER:
            if not run_dir.is_complete(round_, stage):
                continue
            metrics, walltime = run_dir.stage_metrics(round_, stage), _completed_at(run_dir, round_, stage)
            log_stage(writer, round_, stage, metrics, walltime)
            if stage == "promote":
                log_round(writer, metrics, walltime)


def _completed_at(run_dir: Any, round_: int, stage: str) -> float | None:
    try:
        return float(json.loads((run_dir.stage_dir(round_, stage) / MARKER).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the writer's clock, then


def open_writer(run_dir: Any, purge: bool = False) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    path = log_dir(run_dir)
    close(path)  # a run started again in this process without having ended
    # purge_step=0 starts the file with a SessionLog.START at step 0: TensorBoard then drops
    # every point of the earlier event files, which replay() writes again. Fresh runs get one
    # too, since TensorBoard's server takes the first START of a run for the initial one.
    writer = _writers[path] = SummaryWriter(str(path), purge_step=0 if purge else None)
    return writer


def writer_for(run_dir: Any) -> Any:
    # Without a run start (hooks called directly) open without purging: nothing gets replayed.
    return _writers.get(log_dir(run_dir)) or open_writer(run_dir)


def close(path: Path) -> None:
    writer = _writers.pop(path, None)
    if writer is not None:
        writer.close()


@atexit.register
def _close_all() -> None:  # a run that never reached selfloop_on_run_end still gets its tail
    for path in list(_writers):
        close(path)


@hookimpl
def selfloop_on_run_start(ctx):
    from omegaconf import OmegaConf

    writer = open_writer(ctx.run_dir, purge=True)
    replay(writer, ctx.run_dir)
    # Four-space indent: a Markdown code block, so TensorBoard's text tab keeps the YAML layout.
    yaml = "".join(f"    {line}\n" for line in OmegaConf.to_yaml(ctx.cfg).splitlines())
    writer.add_text("run/config", yaml, 0)
    writer.flush()


@hookimpl
def selfloop_on_stage_end(ctx, stage, metrics, replayed):
    if replayed:  # the stage is on disk: selfloop_on_run_start's replay() logged it already
        return
    writer = writer_for(ctx.run_dir)
    log_stage(writer, metrics.get("round", ctx.round), stage, metrics)
    writer.flush()  # a real stage takes minutes: let a live TensorBoard show it


@hookimpl
def selfloop_on_round_end(ctx, record, replayed):
    if replayed:
        return
    writer = writer_for(ctx.run_dir)
    log_round(writer, record)
    writer.flush()


@hookimpl
def selfloop_on_run_end(ctx, status):
    try:
        writer_for(ctx.run_dir).add_text("run/status", status, ctx.round)
    finally:  # failed runs too: the writer must not outlive its run
        close(log_dir(ctx.run_dir))
