"""The run directory: one per run, written so that a killed run loses nothing finished.

Layout::

    run.json                  status, versions, plugins, the config's hash (written first)
    .hydra/config.yaml        the composed config (and overrides.yaml, hydra.yaml)
    round-NNN/<stage>/        data/ (Arrow), model/ (safetensors), metrics.json,
                              row_errors.jsonl, COMPLETE (with the size and hash of every file)
    round-NNN/.<stage>.checkpoints/   resumable state of a running stage (training checkpoints)
    metrics.jsonl             one record per finished round (rebuilt from round records)
    observers.json            the last stage and round events delivered to observers
    report.md, curves.png, selfloop.log, run.lock

A stage is written into a hidden ``.<stage>.partial*`` directory, its ``COMPLETE`` marker
last, and then renamed into place: a stage directory either is complete or does not exist.
A completed stage is never written to again; its files are checked against the marker's
hashes before they are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from selfloop.errors import RunDirError

MARKER = "COMPLETE"
STAGE_ORDER = ("acquire", "filter", "optimize", "evaluate", "promote")
TMP_SUFFIX = ".selfloop-tmp"
ROW_ERRORS = "row_errors.jsonl"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# what open() and mkdir() would give: mkstemp and mkdtemp make 0600 files and 0700 directories
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temp file, fsync, rename), with the usual
    permissions (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("selfloop", "torch", "transformers", "trl", "datasets", "hydra-core", "omegaconf", "pluggy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def parse_stage(spec: str) -> tuple[int, str]:
    """``round-001/acquire`` (or ``1/acquire``) -> (1, "acquire")."""
    head, _, stage = spec.strip("/").partition("/")
    try:
        round_ = int(head.removeprefix("round-"))
    except ValueError:
        round_ = -1
    if round_ < 0 or stage not in STAGE_ORDER:
        raise RunDirError(f"cannot read stage {spec!r}; expected round-NNN/STAGE with STAGE one of {', '.join(STAGE_ORDER)}")
    return round_, stage


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._verified: set[tuple[int, str]] = set()

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

    @property
    def observers_json(self) -> Path:
        return self.root / "observers.json"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One process per run directory, taken before anything else is written."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "run.lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(f"{self.root} is in use by another selfloop process") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

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

    def holds_a_run(self) -> bool:
        """True once a run has started here (a start killed before its config was saved,
        with no stage written, does not count: ``selfloop run`` may start again)."""
        if not self.run_json.exists():
            return False
        try:
            info = json.loads(self.run_json.read_text())
        except json.JSONDecodeError:
            return True
        return not (info.get("status") == "starting" and not any(self.root.glob("round-*")))

    def config_digest(self) -> str:
        return file_digest(self.config_path)

    def validate_for_resume(self) -> None:
        if not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} does not exist")
        if not self.run_json.exists() and not self.config_path.exists():
            raise RunDirError(f"{self.root} is not a selfloop run directory (no run.json, no .hydra/config.yaml)")
        info = self.read_run_json()
        if not self.config_path.is_file():
            if info.get("status") == "starting":
                raise RunDirError(
                    f"{self.root} holds a run that was stopped while starting, before its config was saved; "
                    f"start it again with `selfloop run ... hydra.run.dir={self.root}`"
                )
            raise RunDirError(f"{self.root} has no .hydra/config.yaml: its config was deleted or damaged")
        saved = info.get("config_sha256")
        if saved and saved != self.config_digest():
            raise RunDirError(
                f"{self.config_path} changed since the run started (its hash differs from run.json's): a resumed run must use "
                f"the config it started with; restore the file, or start a new run with the new config"
            )

    def clean_temporary_files(self) -> list[Path]:
        """Temp files of atomic writes interrupted by a kill."""
        found = [p for p in self.root.rglob(f"*{TMP_SUFFIX}") if p.is_file()]
        for p in found:
            p.unlink(missing_ok=True)
        return found

    # -- stages --------------------------------------------------------------------------
    def round_dir(self, round_: int) -> Path:
        return self.root / f"round-{round_:03d}"

    def stage_dir(self, round_: int, stage: str) -> Path:
        return self.round_dir(round_) / stage

    def checkpoint_dir(self, round_: int, stage: str) -> Path:
        return self.round_dir(round_) / f".{stage}.checkpoints"

    def is_complete(self, round_: int, stage: str) -> bool:
        return (self.stage_dir(round_, stage) / MARKER).is_file()

    def stages(self) -> list[tuple[int, str]]:
        """Every (round, stage) that has a directory, in run order."""
        out = []
        for d in self.root.glob("round-*"):
            try:
                round_ = int(d.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            out += [(round_, s) for s in STAGE_ORDER if (d / s).is_dir()]
        return sorted(out, key=lambda rs: (rs[0], STAGE_ORDER.index(rs[1])))

    def clean_partial(self) -> list[str]:
        """Remove what a killed run left half-written; return a description of each removal.

        A stage directory without its marker is removed only when nothing completed after it:
        later stages may have been built from it (its marker was deleted or lost), and
        removing it would lose them, so that is an error naming ``--redo``.
        """
        removed = []
        for partial in sorted(self.root.glob("round-*/.*.partial*")):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(f"{partial.parent.name}/{partial.name} (half-written)")
        stages = self.stages()
        for i, (round_, stage) in enumerate(stages):
            if self.is_complete(round_, stage):
                continue
            later = [f"round-{r:03d}/{s}" for r, s in stages[i + 1 :] if self.is_complete(r, s)]
            where = f"round-{round_:03d}/{stage}"
            if later:
                raise RunDirError(
                    f"{self.root / where} has no {MARKER} marker, but later stages that may depend on it are complete "
                    f"({', '.join(later[:3])}{'...' if len(later) > 3 else ''}): it was damaged. Recompute it and "
                    f"everything after it with `selfloop resume {self.root} --redo {where}`"
                )
            shutil.rmtree(self.stage_dir(round_, stage))
            removed.append(f"{where} (no {MARKER} marker)")
        for ckpt in sorted(self.root.glob("round-*/.*.checkpoints")):
            stage = ckpt.name.split(".")[1]
            round_ = int(ckpt.parent.name.split("-")[1])
            if self.is_complete(round_, stage):
                shutil.rmtree(ckpt, ignore_errors=True)
        return removed

    def redo(self, round_: int, stage: str) -> list[str]:
        """Remove ``round_/stage`` and every stage after it, so that resume recomputes them."""
        order = (round_, STAGE_ORDER.index(stage))
        removed = []
        for r, s in self.stages():
            if (r, STAGE_ORDER.index(s)) >= order:
                shutil.rmtree(self.stage_dir(r, s))
                shutil.rmtree(self.checkpoint_dir(r, s), ignore_errors=True)
                removed.append(f"round-{r:03d}/{s}")
        if not removed:
            raise RunDirError(f"{self.root} has no stage round-{round_:03d}/{stage} or later to redo")
        self._verified.clear()
        self.write_metrics_jsonl()
        return removed

    def write_stage(self, round_: int, stage: str, metrics: dict[str, Any], write: Callable[[Path], None] | None = None,
                    row_errors: list[dict[str, str]] | None = None) -> Path:
        """Write a stage's outputs via ``write(tmp_dir)``, then metrics and the marker (with
        every file's size and hash), then rename into place."""
        final = self.stage_dir(round_, stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}.partial", dir=final.parent))
        try:
            if write is not None:
                write(tmp)
            if row_errors:
                atomic_write_text(tmp / ROW_ERRORS, "".join(json.dumps(e) + "\n" for e in row_errors))
            atomic_write_json(tmp / "metrics.json", metrics)
            marker = {"round": round_, "stage": stage, "time": time.time(), "files": _manifest(tmp)}
            atomic_write_json(tmp / MARKER, marker)
            os.chmod(tmp, DIR_MODE)
            if final.exists():  # an incomplete leftover (complete stages are never rewritten)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.checkpoint_dir(round_, stage), ignore_errors=True)
        self._verified.add((round_, stage))
        return final

    def verify(self, round_: int, stage: str) -> None:
        """Check a completed stage's files against its marker (once per process); a
        mismatch is one error naming the file, the stage and how to recompute it."""
        if (round_, stage) in self._verified:
            return
        folder = self.stage_dir(round_, stage)
        where = f"round-{round_:03d}/{stage}"
        try:
            expected = json.loads((folder / MARKER).read_text()).get("files")
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{folder / MARKER} is unreadable ({exc}); recompute the stage with `selfloop resume {self.root} --redo {where}`") from None
        if expected is not None:  # markers written before 0.2 carry no manifest
            for rel, want in expected.items():
                path = folder / rel
                problem = None
                if not path.is_file():
                    problem = "is missing"
                elif path.stat().st_size != want["size"]:
                    problem = f"has {path.stat().st_size} bytes, {want['size']} when the stage completed"
                elif file_digest(path) != want["sha256"]:
                    problem = "changed since the stage completed (its SHA-256 differs)"
                if problem:
                    raise RunDirError(
                        f"{path} {problem}: stage {where} is damaged. Recompute it and the stages after it with "
                        f"`selfloop resume {self.root} --redo {where}`"
                    )
        self._verified.add((round_, stage))

    def stage_metrics(self, round_: int, stage: str) -> dict[str, Any]:
        path = self.stage_dir(round_, stage) / "metrics.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            where = f"round-{round_:03d}/{stage}"
            raise RunDirError(f"{path} is missing or corrupt although its stage is marked complete ({exc}); recompute it with `selfloop resume {self.root} --redo {where}`") from None

    def row_errors(self, round_: int, stage: str) -> list[dict[str, str]]:
        path = self.stage_dir(round_, stage) / ROW_ERRORS
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

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
        atomic_write_text(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in records))
        return records

    # -- observer delivery ---------------------------------------------------------------
    def delivered(self) -> dict[str, Any]:
        """What observers have acknowledged: {"stage": [round, stage], "round": round}."""
        try:
            return json.loads(self.observers_json.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def acknowledge(self, **event: Any) -> None:
        atomic_write_json(self.observers_json, {**self.delivered(), **event})


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise RunDirError(f"no {path.name} in {path.parent}: the run has not finished a round yet") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path}:{number} is corrupt: {exc}") from None
    return out
