"""The program the sandbox runs in its child interpreter: fence itself in, then run one job.

Run as ``python -I -B [-S] _sandbox_child.py <job dir>`` by :mod:`rlkv.tasks.sandbox`, with
the job dir's ``work/`` subdirectory as the working directory. Before any untrusted code runs
it (1) reads and deletes ``job.marshal`` (code, tests, limits and a nonce), (2) opens
``verdict.txt`` for its verdict, (3) lowers its own resource limits (address space, CPU
seconds, file size, core dumps, and processes when not root) and (4) installs an audit hook,
which no Python code can remove, that refuses process creation, signals to other processes,
sockets, ctypes, changing limits, and any file write, removal, rename or permission change
outside ``work/``. Limits are set here rather than in a ``preexec_fn`` of the parent because
``preexec_fn`` is not safe when the parent runs sandboxes from several threads.

It then executes the code and each test in one namespace (``__name__ == "__main__"``) and
writes its verdict as three lines, nonce, status and details: "passed" only once every test
has run, "failed" for a failing assert, "error" for anything else (including the code exiting
early). It ends with ``os._exit`` so that stray threads cannot delay it. It imports only builtin modules
(``marshal`` rather than ``json`` halves its start-up time) and keeps ``_posixsubprocess``
unimported, since its ``fork_exec`` raises no audit event.
"""

import marshal
import os
import resource
import signal
import sys
from collections.abc import Callable

_DENIED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "socket.__new__", "resource.setrlimit", "resource.prlimit", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.dlsym/handle", "os.chroot",
})  # fmt: skip
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes"})
_PATH_EVENTS = {  # event -> ((position of a path argument, position of its dir_fd or None), ...)
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.chflags": ((0, None),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MAX_DETAILS = 2000


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _inside(root: str, path: str | bytes | int, dir_fd: int | None) -> bool:
    """Whether ``path`` (relative to ``dir_fd`` if given, else the cwd) lies inside ``root``."""
    if isinstance(path, int):
        path = _fd_path(path)
    path = os.fsdecode(path)
    if dir_fd is not None and dir_fd != -1 and not os.path.isabs(path):
        path = os.path.join(_fd_path(dir_fd), path)
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def _guard(root: str) -> Callable[[str, tuple], None]:
    """The audit hook fencing the untrusted code in (see the module docstring)."""

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in _DENIED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")  # optional imports degrade
        if event == "open":
            path, _, flags = args
            if isinstance(path, int) or not flags & _WRITE_FLAGS or _inside(root, path, None):
                return
            raise PermissionError(f"sandbox: writing {os.fsdecode(path)!r} outside the working directory")
        for path_at, dir_fd_at in _PATH_EVENTS.get(event, ()):
            dir_fd = None if dir_fd_at is None else args[dir_fd_at]
            if not _inside(root, args[path_at], dir_fd):
                raise PermissionError(f"sandbox: {event} on {args[path_at]!r} outside the working directory")

    return hook


def _user_tasks(uid: int) -> int:
    """Processes and threads owned by ``uid`` now (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count


def _limit(limits: dict) -> None:
    def cap(which: int, value: int, grace: int = 0) -> None:
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value, grace = min(value, hard), min(grace, max(hard - value, 0))
        resource.setrlimit(which, (value, value + grace))

    cap(resource.RLIMIT_AS, limits["memory_bytes"])
    cap(resource.RLIMIT_CPU, limits["cpu_seconds"], grace=1)  # SIGXCPU at the limit, SIGKILL 1 s later
    cap(resource.RLIMIT_FSIZE, limits["file_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    if os.getuid() != 0:  # the kernel does not enforce RLIMIT_NPROC for root
        cap(resource.RLIMIT_NPROC, _user_tasks(os.getuid()) + limits["max_processes"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing


def _describe(error: BaseException) -> str:
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:
        text = type(error).__name__
    return text[:_MAX_DETAILS]


def _run(code: str, tests: list[str]) -> tuple[str, str]:
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
    except SystemExit as e:
        return "error", f"the solution exited (SystemExit {e.code!r}) before the tests ran"
    except BaseException as e:
        return "error", f"the solution raised {_describe(e)}"
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {index}>", "exec"), namespace)
        except AssertionError as e:
            message = f" ({_describe(e)})" if e.args else ""
            return "failed", f"test {index} failed: {test[:_MAX_DETAILS]}{message}"
        except SystemExit as e:
            return "error", f"test {index} exited (SystemExit {e.code!r}) instead of finishing"
        except BaseException as e:
            return "error", f"test {index} raised {_describe(e)}: {test[:_MAX_DETAILS]}"
    return "passed", f"all {len(tests)} tests passed"


def main(job_dir: str) -> None:
    job_path = os.path.join(job_dir, "job.marshal")
    with open(job_path, "rb") as f:
        job = marshal.load(f)
    os.remove(job_path)
    verdict = open(os.path.join(job_dir, "verdict.txt"), "w", encoding="utf-8")
    write, flush, nonce = verdict.write, verdict.flush, job["nonce"]
    streams = (sys.stdout, sys.stderr)
    _limit(job["limits"])
    sys.addaudithook(_guard(os.path.realpath(os.getcwd())))
    status, details = _run(job["code"], job["tests"])
    for stream in streams:
        try:
            stream.flush()
        except Exception:
            pass  # a full output file must not cost the verdict
    write(f"{nonce}\n{status}\n{details}")
    flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
