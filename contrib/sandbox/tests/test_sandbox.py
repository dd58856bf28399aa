"""The sandbox: programs that try to escape, hog resources or misbehave, and the ordinary path.

Every escape test leaves evidence outside the sandbox if it succeeds (a file, a deleted or
renamed file, a connection, output that holds a secret), and checks the evidence, not only
the exit code. Escapes are tried against the default configuration, and, separately, against
each layer alone where the machine provides it.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from selfloop_sandbox.sandbox import Sandbox, SandboxConfig, SandboxError, run

ROOT = os.geteuid() == 0


def sandbox(**options) -> Sandbox:
    return Sandbox(SandboxConfig(**options))


@pytest.fixture(scope="module")
def caps():
    """What this machine grants: a network namespace? (root, or unprivileged user namespaces)"""
    return {"netns": run("pass").network_isolated}


# -- the ordinary path ---------------------------------------------------------------------
def test_a_correct_program_passes():
    r = run("print(6 * 7)")
    assert r.ok and r.returncode == 0 and r.stdout == "42\n" and r.stderr == ""
    assert not r.timed_out and r.killed is None and not r.truncated


def test_a_wrong_program_fails():
    r = run("assert 6 * 7 == 43, 'wrong'")
    assert not r.ok and r.returncode == 1 and "AssertionError: wrong" in r.stderr


def test_a_syntax_error_fails():
    r = run("def broken(:\n    pass")
    assert not r.ok and r.returncode == 1 and "SyntaxError" in r.stderr


def test_exit_codes_pass_through():
    assert run("raise SystemExit(3)").returncode == 3
    assert run("import sys; sys.exit(0)").ok


def test_a_fresh_directory_isolated_interpreter_and_stripped_environment(monkeypatch):
    monkeypatch.setenv("SELFLOOP_SECRET_TOKEN", "hunter2")
    program = "import os, sys; print(os.getcwd()); print(sorted(os.environ)); print(sys.flags.isolated, sys.flags.no_site)"
    first, second = run(program), run(program)
    cwd, env, flags = first.stdout.splitlines()
    assert cwd != second.stdout.splitlines()[0], "every program gets its own directory"
    assert not os.path.exists(cwd), "the directory is deleted afterwards"
    assert "SELFLOOP_SECRET_TOKEN" not in env and eval(env) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]
    assert flags == "1 1"


def test_files_written_by_one_program_are_gone_for_the_next():
    assert run("open('note.txt', 'w').write('hi'); print(open('note.txt').read())").stdout == "hi\n"
    assert not run("open('note.txt')").ok


def test_run_many_keeps_input_order():
    results = sandbox(workers=2).run_many([f"print({i} * {i})" for i in range(8)])
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]
    assert sandbox().run_many([]) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="network"):
        sandbox(network="sometimes")
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox(timeout_s=0)


# -- escapes against the default configuration ----------------------------------------------
@pytest.fixture
def outside(tmp_path):
    """Files outside the sandbox: a secret to read, a victim to delete, a path to create."""
    (tmp_path / "secret.txt").write_text("the-secret-42")
    (tmp_path / "victim.txt").write_text("still here")
    return {"dir": tmp_path, "secret": tmp_path / "secret.txt", "victim": tmp_path / "victim.txt", "target": tmp_path / "escaped.txt"}


ESCAPES = {
    "write a file": "open({target!r}, 'w').write('escaped')",
    "write with os.open": "import os; os.close(os.open({target!r}, os.O_CREAT | os.O_WRONLY))",
    "delete a file": "import os; os.remove({victim!r})",
    "rename a file away": "import os; os.rename({victim!r}, 'mine.txt')",
    "truncate a file": "import os; os.truncate({victim!r}, 0)",
    "read a secret": "print(open({secret!r}).read())",
    "list a directory": "import os; print(os.listdir({dir!r}))",
    "run a shell command": "import os; os.system('echo escaped > {target}')",
    "start a subprocess": "import subprocess; subprocess.run(['/bin/sh', '-c', 'echo escaped > {target}'])",
    "fork": "import os\nif os.fork() == 0:\n    open({target!r}, 'w').write('escaped')",
    "exec a shell": "import os; os.execv('/bin/sh', ['sh', '-c', 'echo escaped > {target}'])",
    "load ctypes": "import ctypes; ctypes.CDLL(None).system(b'echo escaped > {target}')",
}


def escaped(outside, result) -> list[str]:
    evidence = []
    if outside["target"].exists():
        evidence.append("created a file outside")
    if not outside["victim"].exists() or outside["victim"].read_text() != "still here":
        evidence.append("deleted or changed a file outside")
    if "the-secret-42" in result.stdout + result.stderr or "victim.txt" in result.stdout:
        evidence.append("read outside")
    return evidence


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_attempts_fail(name, outside):
    program = ESCAPES[name].format(**{k: str(v) for k, v in outside.items()})
    # preload: the imports succeed even where nobody cannot read the standard library, so the
    # attempt itself is what gets refused
    r = sandbox(preload="subprocess").run(program)
    assert not r.ok, f"{name}: the program succeeded\n{r.stderr}"
    assert not escaped(outside, r), f"{name}: {escaped(outside, r)}"
    assert "PermissionError: sandbox:" in r.stderr or "ImportError" in r.stderr, r.stderr


def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    return server


def connections(server) -> int:
    try:
        server.accept()[0].close()
        return 1
    except socket.timeout:
        return 0


@pytest.mark.parametrize("how", ["connect", "bind", "resolve"])
def test_no_network(how):
    server = listener()
    port = server.getsockname()[1]
    program = {
        "connect": f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')",
        "bind": "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(1)",
        "resolve": "import socket; print(socket.getaddrinfo('example.com', 80))",
    }[how]
    with server:
        r = sandbox(preload="socket,encodings.idna").run(program)
        assert not r.ok and "PermissionError: sandbox: socket." in r.stderr, r.stderr
        assert connections(server) == 0


def test_the_network_namespace_alone_blocks_connections(caps):
    if not caps["netns"]:
        pytest.skip("no network namespace here (needs root or unprivileged user namespaces)")
    server = listener()
    program = f"import socket; socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1)"
    with server:
        r = sandbox(audit=False, preload="socket,encodings.idna").run(program)
        assert not r.ok and r.network_isolated and "unreachable" in r.stderr.lower(), r.stderr
        assert connections(server) == 0


def test_network_require_and_off(caps):
    assert not sandbox(network="off").run("pass").network_isolated
    if caps["netns"]:
        assert sandbox(network="require").run("pass").network_isolated
    else:
        with pytest.raises(SandboxError, match="network"):
            sandbox(network="require").run("pass")


@pytest.mark.skipif(not ROOT, reason="the OS layer for files is running as nobody, which needs root")
@pytest.mark.parametrize("name", ["write a file", "delete a file", "read a secret", "fork", "start a subprocess"])
def test_without_the_audit_hook_the_os_still_refuses(name, outside):
    # Only the hard layers: uid nobody (files), RLIMIT_NPROC (processes). The files sit in a
    # directory anyone may enter, so file permissions alone stand in the way.
    shared = Path(tempfile.mkdtemp(prefix="sandbox-test-"))
    try:
        shared.chmod(0o755)
        for key in ("secret", "victim"):
            outside[key] = Path(shutil.copy(outside[key], shared))
        outside["secret"].chmod(0o600)
        outside.update(dir=shared, target=shared / "escaped.txt")
        program = ESCAPES[name].format(**{k: str(v) for k, v in outside.items()})
        r = sandbox(audit=False, preload="subprocess").run(program)
        assert r.uid == 65534
        assert not r.ok and not escaped(outside, r), f"{name}: {escaped(outside, r)}\n{r.stderr}"
    finally:
        shutil.rmtree(shared)


def test_the_audit_hook_alone_refuses(outside):
    # No privilege drop, no network namespace: what the hook blocks by itself.
    options = dict(drop_root=False, network="off", preload="subprocess")
    for name in ("write a file", "delete a file", "read a secret", "fork", "start a subprocess"):
        r = sandbox(**options).run(ESCAPES[name].format(**{k: str(v) for k, v in outside.items()}))
        assert not r.ok and not escaped(outside, r) and "PermissionError: sandbox:" in r.stderr, (name, r.stderr)


def test_the_hook_cannot_be_rewritten():
    program = textwrap.dedent("""
        import sys
        def nothing(event, args):
            pass
        nothing.__code__ = (lambda event, args: None).__code__
    """)
    r = run(program)
    assert not r.ok and "object.__setattr__" in r.stderr


# -- resources ----------------------------------------------------------------------------
def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user (nobody) still holds the group
        return True


@pytest.mark.parametrize("program", ["while True: pass", "import time; time.sleep(60)"])
def test_endless_programs_are_killed_at_the_timeout(program):
    started = time.monotonic()
    r = sandbox(timeout_s=1.0, cpu_s=30).run(program)
    assert r.timed_out and r.killed == "timeout" and not r.ok
    assert time.monotonic() - started < 5
    assert not group_alive(r.pid), "the process group outlived the sandbox"


def test_cpu_time_is_limited():
    r = sandbox(timeout_s=30, cpu_s=1).run("while True: pass")
    assert r.killed == "cpu_time" and not r.timed_out and r.duration_s < 10


@pytest.mark.parametrize("program", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_memory_is_limited_and_the_parent_unaffected(program):
    before = resource.getrlimit(resource.RLIMIT_AS)
    r = sandbox(memory_mb=200, timeout_s=20).run(program)
    assert not r.ok and r.memory_exceeded and r.killed == "memory", r.stderr
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    big = bytearray(300 * 2**20)  # the parent can still allocate more than the child could
    assert len(big) == 300 * 2**20 and run("print(1)").ok


def test_huge_output_is_capped_and_truncated():
    r = sandbox(file_size_mb=1, max_output_chars=1000).run("while True:\n    print('x' * 1000)")
    assert not r.ok and not r.timed_out and r.truncated
    assert len(r.stdout) == 1000 and set(r.stdout) <= {"x", "\n"}
    ok = sandbox(max_output_chars=100).run("print('y' * 100_000)")
    assert ok.ok and ok.truncated and ok.stdout == "y" * 100


def test_open_files_are_limited():
    r = sandbox(open_files=16).run("fs = [open(f'f{i}', 'w') for i in range(64)]")
    assert not r.ok and "Too many open files" in r.stderr


def test_programs_run_as_nobody_when_started_as_root():
    r = run("import os; print(os.getuid())")
    assert r.stdout.strip() == ("65534" if ROOT else str(os.getuid()))
