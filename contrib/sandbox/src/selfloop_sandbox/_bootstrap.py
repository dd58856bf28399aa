"""The child side of the sandbox: confine this interpreter, then run ``main.py``.

The parent starts ``python -I -S`` on this module's compiled code with the settings as
arguments (``main`` names them), in a new session whose working directory is the sandbox's
temporary directory. In order: read the program, import the preloaded modules, leave the
network (a private network namespace), drop root, set the rlimits, report on the status fd
and close it, install the audit hook, run the program as ``__main__``. This runs once per
program, so it imports only what costs nothing (no json, re or ctypes). The parent never
imports it.
"""

import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
NOBODY = 65534


def load_libc():
    """``unshare`` and ``prctl`` from libc, built on ``_ctypes``: importing ``ctypes`` would
    cost every program about 3 ms."""
    try:
        import _ctypes

        class Int(_ctypes._SimpleCData):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL
            _restype_ = Int

        libc = type("Libc", (), {"_handle": _ctypes.dlopen(None)})()
        return type("Calls", (), {n: staticmethod(Function((n, libc))) for n in ("unshare", "prctl")})
    except Exception:  # no _ctypes, or its private API moved: the public one
        try:
            import ctypes

            return ctypes.CDLL(None)
        except Exception:
            return None


LIBC = load_libc()  # now, while the standard library is surely readable

# Refused outright once the program runs.
BLOCKED_EVENTS = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
}
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_winapi.", "winreg.")
# Modules that reach below the audit events (raw fork/exec, foreign calls).
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"}
# Path-mutating events: (indices of path arguments, indices of dir_fd arguments).
MUTATIONS = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.chflags": ((0,), ()),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)),  # the target may be anything: opens resolve links
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)),
}
LISTINGS = {"os.listdir", "os.scandir"}


def leave_network(mode):
    """A private network namespace (only a loopback that is down); True if we got one."""
    if mode == "off" or LIBC is None:
        return False
    if LIBC.unshare(CLONE_NEWNET) == 0:  # root (CAP_SYS_ADMIN)
        return True
    uid, gid = os.getuid(), os.getgid()
    if LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:  # unprivileged user namespaces disabled
        return False
    # Map our own ids, so files we create keep their owner (unmapped ids cannot create files).
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    return True


def prctl_guards(parent):
    """Die with the parent (timeouts are the parent's job) and never gain privileges by exec."""
    if LIBC is None:
        return
    LIBC.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(137)


def set_limits(cpu_s, memory_mb, file_size_mb, open_files):
    r = resource
    mb = 1024 * 1024
    limits = [
        (r.RLIMIT_CORE, 0),
        (r.RLIMIT_CPU, cpu_s),
        (r.RLIMIT_AS, memory_mb * mb),
        (r.RLIMIT_FSIZE, file_size_mb * mb),
        (r.RLIMIT_NOFILE, open_files),
        # Processes and threads of this user; ignored for root, hence drop_root.
        (r.RLIMIT_NPROC, 0),
    ]
    for which, value in limits:
        hard = r.getrlimit(which)[1]
        if hard != r.RLIM_INFINITY:
            value = min(value, hard)
        # CPU: SIGXCPU at the soft limit, then SIGKILL a second later should it be caught.
        top = value + 1 if which == r.RLIMIT_CPU and (hard == r.RLIM_INFINITY or value < hard) else value
        r.setrlimit(which, (value, top))


def install_hook(tmp, read_roots):
    """Refuse what a generated program has no business doing (defense in depth only)."""
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    write_roots = (tmp,)
    read_roots = tuple(read_roots) + write_roots
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, roots):
        try:
            p = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == root or p.startswith(root + sep) for root in roots)

    def deny(event, detail=""):
        raise PermissionError(f"sandbox: {event} {detail}".rstrip())

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):  # an inherited descriptor (stdout...)
                return
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            if not inside(path, write_roots if writing else read_roots):
                deny(event, f"{path!r} for {'writing' if writing else 'reading'}")
        elif event in MUTATIONS:
            paths, dir_fds = MUTATIONS[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
                deny(event, "with dir_fd")
            for i in paths:
                if i < len(args) and (isinstance(args[i], int) or not inside(args[i], write_roots)):
                    deny(event, repr(args[i]))
        elif event in LISTINGS:
            path = args[0] if args and args[0] is not None else "."
            if isinstance(path, int) or not inside(path, read_roots):
                deny(event, repr(path))
        elif event == "import":
            if args[0] in BLOCKED_IMPORTS:
                deny(event, args[0])
        elif event in BLOCKED_EVENTS or event.startswith(BLOCKED_PREFIXES):
            deny(event)
        elif event == "object.__setattr__" and len(args) > 1 and args[1] == "__code__":
            deny(event, "__code__")  # would let a program rewrite this hook

    sys.addaudithook(hook)


def main():
    cpu_s, memory_mb, file_size_mb, open_files, parent, status_fd = map(int, sys.argv[1:7])
    network, audit, drop_root, preload = sys.argv[7:11]
    tmp = os.path.realpath(os.getcwd())
    with open("main.py", encoding="utf-8") as fh:
        source = fh.read()
    for name in filter(None, preload.split(",")):  # while the standard library is surely readable
        __import__(name)
    isolated = leave_network(network)
    error = "" if isolated or network != "require" else "network=require, but no network namespace could be created"
    if drop_root == "1" and os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    prctl_guards(parent)  # after setuid, which clears the death signal
    set_limits(cpu_s, memory_mb, file_size_mb, open_files)
    with os.fdopen(status_fd, "w") as fh:
        fh.write(f"error {error}" if error else f"ok {int(isolated)} {os.getuid()}")
    if error:
        sys.exit(2)
    global LIBC
    LIBC = None
    for name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)
    if audit == "1":
        install_hook(tmp, [os.path.realpath(os.path.dirname(os.__file__)), "/dev/null", "/dev/urandom", "/dev/zero"])
    module = type(sys)("__main__")
    module.__file__ = os.path.join(tmp, "main.py")
    sys.argv = [module.__file__]
    sys.modules["__main__"] = module
    code = compile(source, "main.py", "exec")
    exec(code, module.__dict__)


if __name__ == "__main__":
    main()
