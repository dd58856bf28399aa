"""The run directory: one per run, written so that a killed run loses nothing finished.

Layout::

    .hydra/config.yaml        the composed config (written by Hydra)
    run.json                  versions, plugins, status
    round-NNN/<stage>/        data/ (Arrow), model/ (safetensors), metrics.json, COMPLETE
    metrics.jsonl             one record per finished round (rebuilt from round records)
    report.md, curves.png

A stage is written into a hidden ``.<stage>.partial`` directory, its ``COMPLETE`` marker
last, and then renamed into place: a stage directory either is complete or does not
exist. Leftover partial directories are removed on resume.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from selfloop.errors import RunDirError

MARKER = "COMPLETE"
STAGE_ORDER = ("acquire", "filter", "optimize", "evaluate", "promote")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("selfloop", "torch", "transformers", "trl", "datasets", "hydra-core", "omegaconf", "pluggy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- whole run -----------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / ".hydra" / "config.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    def read_run_json(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.root} is not a selfloop run directory: no run.json") from None
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.run_json} is corrupt: {exc}") from None

    def write_run_json(self, **updates: Any) -> dict[str, Any]:
        info = self.read_run_json() if self.run_json.exists() else {"created": time.time()}
        info.update(updates, updated=time.time())
        atomic_write_json(self.run_json, info)
        return info

    def validate_for_resume(self) -> None:
        if not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} does not exist")
        if not self.config_path.is_file():
            raise RunDirError(f"{self.root} has no .hydra/config.yaml: not a selfloop run directory (or it was damaged)")
        self.read_run_json()

    # -- stages --------------------------------------------------------------------------
    def round_dir(self, round_: int) -> Path:
        return self.root / f"round-{round_:03d}"

    def stage_dir(self, round_: int, stage: str) -> Path:
        return self.round_dir(round_) / stage

    def is_complete(self, round_: int, stage: str) -> bool:
        return (self.stage_dir(round_, stage) / MARKER).is_file()

    def clean_partial(self) -> list[Path]:
        """Remove half-written stages left by a killed run; return what was removed."""
        removed = []
        for partial in self.root.glob("round-*/.*.partial*"):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
        for stage_dir in self.root.glob("round-*/*"):
            if stage_dir.is_dir() and not (stage_dir / MARKER).exists():
                shutil.rmtree(stage_dir, ignore_errors=True)
                removed.append(stage_dir)
        return removed

    def write_stage(self, round_: int, stage: str, metrics: dict[str, Any], write: Callable[[Path], None] | None = None) -> Path:
        """Write a stage's outputs via ``write(tmp_dir)``, then metrics and marker, then rename."""
        final = self.stage_dir(round_, stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}.partial", dir=final.parent))
        try:
            if write is not None:
                write(tmp)
            atomic_write_json(tmp / "metrics.json", metrics)
            atomic_write_json(tmp / MARKER, {"round": round_, "stage": stage, "time": time.time()})
            if final.exists():  # an incomplete leftover (complete stages are never rewritten)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def stage_metrics(self, round_: int, stage: str) -> dict[str, Any]:
        path = self.stage_dir(round_, stage) / "metrics.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{path} is missing or corrupt although its stage is marked complete: {exc}") from None

    # -- round records -------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """Round records of every promoted-or-rejected round, from the promote stages."""
        out = []
        for d in sorted(self.root.glob("round-*")):
            try:
                round_ = int(d.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if self.is_complete(round_, "promote"):
                out.append(self.stage_metrics(round_, "promote"))
        return out

    def write_metrics_jsonl(self) -> list[dict[str, Any]]:
        records = self.records()
        atomic_write_text(self.metrics_jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return records


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise RunDirError(f"no {path.name} in {path.parent}: the run has not finished a round yet") from None
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is corrupt: {exc}") from None
