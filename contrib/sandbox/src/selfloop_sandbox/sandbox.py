"""Run untrusted Python in a confined subprocess and report what happened.

The hard limits: a wall-clock timeout that kills the program's whole process group; rlimits
set in the child (CPU time, address space, file size, open files, no new processes); a fresh
temporary working directory, deleted afterwards; a stripped environment and an isolated
interpreter (``python -I -S``); a private network namespace when the kernel grants one (root,
or unprivileged user namespaces); and, when started as root, the program runs as ``nobody``.
On top, defense in depth only: an audit hook (PEP 578) that refuses sockets, process
creation, ctypes and file access outside the sandbox. Audit hooks can be bypassed by code
that corrupts the interpreter, so they are not a security boundary (see the README).

Output goes to anonymous files, not pipes: RLIMIT_FSIZE caps it in the child and the
parent reads only ``max_output_chars``, so a program printing forever costs neither side
memory. Standard library only: importing this module is cheap.
"""

from __future__ import annotations

import functools
import logging
import marshal
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

NOBODY = 65534
log = logging.getLogger("selfloop")


@dataclass
class SandboxConfig:
    """Limits for one program. Also the options of the ``code_exec`` filter and evaluator."""

    timeout_s: float = 5.0  # wall clock; then the whole process group is killed
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 256  # RLIMIT_AS (address space, not resident memory)
    file_size_mb: int = 4  # RLIMIT_FSIZE: any file written, stdout and stderr included
    open_files: int = 32  # RLIMIT_NOFILE
    max_output_chars: int = 4096  # of stdout and of stderr kept in the result
    workers: int = 2  # programs run at once by run_many
    # auto: a private network namespace when possible; require: fail without one;
    # off: none (the audit hook still refuses sockets)
    network: str = "auto"
    drop_root: bool = True  # started as root: run programs as nobody (uid 65534)
    audit: bool = True  # install the audit hook
    # modules imported before privileges drop, for interpreters nobody cannot read
    preload: str = ""
    python: str = ""  # the interpreter (default: the current one)


@dataclass
class Result:
    """What one program did. ``ok``: it exited 0 within its limits."""

    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    memory_exceeded: bool = False
    # why it did not finish on its own: timeout, cpu_time, file_size, memory, signal:<n>,
    # or setup (the sandbox itself failed, see stderr)
    killed: str | None = None
    truncated: bool = False  # stdout or stderr was cut to max_output_chars
    network_isolated: bool = False
    uid: int | None = None
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None


class SandboxError(RuntimeError):
    """The sandbox could not be set up as configured (e.g. network=require unavailable)."""


@functools.cache
def _launcher(python: str) -> tuple[str, ...]:
    """How the child gets the bootstrap: compiled here once and marshalled, which saves each
    program compiling it (2-3 ms); as source for another interpreter (marshal is per version)."""
    source = Path(__file__).with_name("_bootstrap.py").read_text()
    if python != sys.executable:
        return ("-c", source)
    code = marshal.dumps(compile(source, "<sandbox bootstrap>", "exec"))
    return ("-c", "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv.pop(1))))", code.hex())


def _read(fh, limit: int) -> tuple[str, bool]:
    fh.seek(0)
    data = fh.read(limit * 4 + 4)  # up to 4 bytes a character
    text = data.decode("utf-8", errors="replace")
    cut = len(text) > limit or fh.read(1) != b""
    return text[:limit], cut


def _rmtree(path: str) -> None:
    """Remove the sandbox directory even if the program made parts of it unwritable."""

    def fix(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=fix)
        else:
            shutil.rmtree(path, onerror=fix)
    except FileNotFoundError:
        pass


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child to exit without reaping it; False on timeout."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): reap, and accept the tiny race
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@functools.cache
def _closed_to_others() -> str | None:
    """The first directory on the way to the standard library that other users cannot enter."""
    stdlib = Path(os.__file__).resolve().parent
    for d in (stdlib, *stdlib.parents):
        if not d.stat().st_mode & stat.S_IXOTH:
            return str(d)
    return None


@functools.cache
def _warn_once(closed: str, preload: str) -> None:
    log.warning(
        "sandbox: programs run as nobody, who cannot enter %s: they can import only the modules "
        "loaded at interpreter start-up and those in the preload option (now %r)", closed, preload,
    )


def _preload(modules: str) -> str:
    return ",".join(m.strip() for m in modules.split(",") if m.strip())


def _validate(c: SandboxConfig) -> None:
    if c.network not in ("auto", "require", "off"):
        raise ValueError(f"sandbox network must be auto, require or off, got {c.network!r}")
    for name in ("timeout_s", "cpu_s", "memory_mb", "file_size_mb", "open_files", "workers"):
        if getattr(c, name) <= 0:
            raise ValueError(f"sandbox {name} must be positive, got {getattr(c, name)}")


class Sandbox:
    """Runs Python programs (source text) one per confined subprocess."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        _validate(self.config)
        c = self.config
        if c.drop_root and os.geteuid() == 0 and not c.python and _closed_to_others():
            _warn_once(_closed_to_others(), c.preload)

    def run(self, source: str) -> Result:
        c = self.config
        drop = c.drop_root and os.geteuid() == 0
        tmp = os.path.realpath(tempfile.mkdtemp(prefix="selfloop-sandbox-"))
        try:
            Path(tmp, "main.py").write_text(source, encoding="utf-8")
            if drop:
                os.chown(tmp, NOBODY, NOBODY)
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as status:
                settings = [
                    c.cpu_s, c.memory_mb, c.file_size_mb, c.open_files, os.getpid(), status.fileno(),
                    c.network, int(c.audit), int(drop), _preload(c.preload),
                ]
                env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
                python = c.python or sys.executable
                argv = [python, "-I", "-S", "-X", "utf8", *_launcher(python), *map(str, settings)]
                started = time.monotonic()
                proc = subprocess.Popen(
                    argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=(status.fileno(),), start_new_session=True,  # its own process group
                )
                try:
                    timed_out = not _wait(proc, c.timeout_s)
                finally:  # also when the parent is interrupted
                    # Kill its whole group, stragglers included, while the exited leader is
                    # still unreaped: its pid (the group id) cannot have been reused yet.
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
                duration = time.monotonic() - started
                stdout, cut_out = _read(out, c.max_output_chars)
                stderr, cut_err = _read(err, c.max_output_chars)
                err.seek(0, os.SEEK_END)
                err.seek(max(0, err.tell() - 1000))
                last_words = err.read().decode(errors="replace")  # where a traceback ends
                status.seek(0)
                info = status.read(4096).decode(errors="replace").split(" ", 1)
        finally:
            _rmtree(tmp)
        if info[0] == "error":
            raise SandboxError(info[1])
        fields = info[1].split() if info[0] == "ok" else []
        code = proc.returncode
        memory = code != 0 and "MemoryError" in last_words
        if timed_out:
            killed = "timeout"
        elif not fields:
            killed = "setup"  # died before confining itself (e.g. too little memory to start)
        elif code == -signal.SIGXCPU or (code == -signal.SIGKILL and duration >= c.cpu_s):
            killed = "cpu_time"
        elif code == -signal.SIGXFSZ:
            killed = "file_size"
        elif code is not None and code < 0:
            killed = f"signal:{-code}"
        elif memory:
            killed = "memory"
        else:
            killed = None
        return Result(
            returncode=code, stdout=stdout, stderr=stderr, duration_s=duration, timed_out=timed_out,
            memory_exceeded=memory, killed=killed, truncated=cut_out or cut_err,
            network_isolated=fields[:1] == ["1"], uid=int(fields[1]) if fields else None, pid=proc.pid,
        )

    def run_many(self, sources: Iterable[str]) -> list[Result]:
        """Run programs concurrently (``workers`` at a time); results in input order."""
        sources = list(sources)
        if len(sources) <= 1 or self.config.workers == 1:
            return [self.run(s) for s in sources]
        with ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, sources))


def run(source: str, **options) -> Result:
    """Run one program with default limits, overridden by ``options`` (SandboxConfig fields)."""
    return Sandbox(SandboxConfig(**options)).run(source)
