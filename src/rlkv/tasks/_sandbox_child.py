"""The program the sandbox runs: jail itself, fork the candidate, and report what it computed.

Run by :mod:`rlkv.tasks.sandbox` as ``[unshare ...] python -I -B [-S] _sandbox_child.py <job dir> <mode>
<results fd> <report fd>`` (``mode``: "root", "user" or "none", see :mod:`rlkv.tasks.isolation`). It reads and deletes
``<job dir>/job.marshal`` (the candidate's code, the steps to run, the limits), then:

1. **Jail** (modes "root" and "user"; it is PID 1 of a fresh PID namespace and root in its own
   mount, network, IPC, UTS and cgroup namespaces): builds a new root on a tmpfs with, read-only
   and nosuid, only ``/usr`` (with the ``/bin``, ``/lib`` ... links) and the Python prefix, plus
   ``/dev/{null,zero,urandom}``, a ``/proc`` of its own PID namespace, an empty read-only
   ``/tmp`` and a private writable tmpfs ``/sandbox`` (the working dir); pivots into it and
   detaches the old root, so no path reaches the host's files.
2. **Supervise**: forks the candidate, then reaps every process of the namespace until the
   candidate exits; it then writes the candidate's exit status and CPU seconds to the report fd and
   exits, and the kernel kills whatever else is left in the namespace.
3. **Candidate**: drops every capability (bounding set, ambient, effective) and, as root, its
   uid/gid to the job's unprivileged ones, sets no-new-privs and resource limits (address
   space, CPU seconds with a precise ``ITIMER_PROF`` below the hard limit, file size, open
   files, processes), installs an audit hook (an inner layer giving clear errors for process
   creation, signals, sockets, ctypes and writes outside the working dir), then runs the code
   and the steps. It writes one line per result to the results fd: ``ok`` after an executed step,
   ``value <literal>`` for each call the parent checks, ``raise <message>`` when something
   raised (it stops there), and ``end``. Values are encoded by :func:`_encode`, which accepts
   only plain data of exact builtin types (and reads ``collections`` dicts as dicts); the parent decodes and
   compares them, so nothing here decides a verdict and nothing the candidate writes can claim a pass it
   did not compute.

It imports only builtin modules (plus ``ctypes`` to jail itself, dropped from ``sys.modules``
before the candidate runs) and ends with ``os._exit``.
"""

import marshal
import os
import resource
import signal
import sys

WORK = "/sandbox"
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
_MAX_DEPTH = 100
# Linux mount(2) / prctl(2) constants (identical on every architecture).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
_KEPT_FLAGS = {4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}
"""statvfs flag -> mount flag kept on a read-only bind (nodev, noexec, noatime, nodiratime, relatime):
a user namespace may not clear them."""
MNT_DETACH, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 2, 38, 24, 47, 4
_DEVICES = ("null", "zero", "urandom")


# ---------------------------------------------------------------- jail (as root of the namespaces)
def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(name: str, *args) -> None:
        if getattr(libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"sandbox: {name}{args!r} failed: {os.strerror(errno)}")

    return call


def _mount(call, source, target, fstype, flags, data=None) -> None:
    def enc(s):
        return None if s is None else os.fsencode(s)

    call("mount", enc(source), enc(target), enc(fstype), flags, enc(data))


def _bind(call, source: str, target: str, writable: bool = False) -> None:
    _mount(call, source, target, None, MS_BIND)
    current = os.statvfs(source).f_flag
    kept = sum(flag for bit, flag in _KEPT_FLAGS.items() if current & bit)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | kept | (0 if writable else MS_RDONLY | MS_NODEV)
    _mount(call, None, target, None, flags)


def _jail(job: dict, new_root: str, mode: str) -> None:
    """Build the sandbox's root on a tmpfs at ``new_root`` and pivot into it (see step 1)."""
    call = _libc()
    _mount(call, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(call, "tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for source in job["read_only"]:
        target = new_root + source
        if os.path.islink(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
            _bind(call, source, target)
    os.makedirs(new_root + "/dev")
    for name in _DEVICES:
        open(f"{new_root}/dev/{name}", "x").close()
        _bind(call, f"/dev/{name}", f"{new_root}/dev/{name}", writable=True)
    for name in ("proc", "tmp", WORK[1:]):  # /tmp may exist already: Python itself may live under it (a venv)
        os.makedirs(f"{new_root}/{name}", exist_ok=True)
    _mount(call, "proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    uid, size = job["uid"], job["limits"]["disk_bytes"]
    _mount(call, "tmpfs", new_root + WORK, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=700,uid={uid},gid={uid}")
    _mount(call, None, new_root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(new_root)
    call("pivot_root", b".", b".")
    call("umount2", b".", MNT_DETACH)
    os.chdir(WORK)
    if mode == "user":  # nested user namespaces would hand the candidate capabilities again
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")


def _drop_privileges(job: dict, mode: str) -> None:
    """No capabilities, no way to gain any (no-new-privs), and in mode "root" the job's own uid."""
    call = _libc()
    call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
    call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if mode == "root":
        uid = job["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    call("capset", header, (ctypes.c_uint32 * 6)())
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("CapEff", "CapPrm", "CapBnd", "CapInh"))]
    if any(int(value, 16) for value in caps):
        raise OSError(f"sandbox: capabilities left after dropping them: {caps}")
    for name in ("ctypes", "_ctypes", "ctypes._endian", "struct", "_struct"):
        sys.modules.pop(name, None)


def _supervise(candidate: int, report_fd: int, wall_seconds: int) -> None:
    """PID 1: reap every process until the candidate exits, report it, exit (see step 2); exit
    anyway after ``wall_seconds``, so that a job outlives no grader that died before killing it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, lambda *_: os._exit(1))
    signal.alarm(wall_seconds)
    cpu = 0.0
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        cpu += usage.ru_utime + usage.ru_stime
        if pid == candidate:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            os.write(report_fd, f"{code} {cpu:.3f}\n".encode())
            break
    os._exit(0)


# ---------------------------------------------------------------- candidate
def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _inside(root: str, path, dir_fd) -> bool:
    """Whether ``path`` (relative to ``dir_fd`` if given, else the cwd) lies inside ``root``."""
    if isinstance(path, int):
        path = _fd_path(path)
    path = os.fsdecode(path)
    if dir_fd is not None and dir_fd != -1 and not os.path.isabs(path):
        path = os.path.join(_fd_path(dir_fd), path)
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def _guard(root: str):
    """The audit hook: an inner layer that fails fast with a clear message (the OS is the fence)."""

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and str(args[0]).rpartition(".")[2] in _DENIED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
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


def _limit(limits: dict, processes: int) -> None:
    def cap(which: int, value: int, grace: int = 0) -> None:
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value, grace = min(value, hard), min(grace, max(hard - value, 0))
        resource.setrlimit(which, (value, value + grace))

    cap(resource.RLIMIT_AS, limits["memory_bytes"])
    cap(resource.RLIMIT_CPU, limits["cpu_seconds"], grace=1)  # SIGXCPU, then SIGKILL 1 s later
    cap(resource.RLIMIT_FSIZE, limits["file_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NOFILE, limits["open_files"])
    if processes:  # not enforced for root in the initial user namespace (mode "none" as root)
        cap(resource.RLIMIT_NPROC, processes + limits["max_processes"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing
    signal.setitimer(signal.ITIMER_PROF, limits["timeout"])  # the precise CPU limit (SIGPROF kills)


def _stdlib_dicts() -> tuple:
    """collections' Counter, OrderedDict and defaultdict, which compare with a dict as a dict does."""
    module = sys.modules.get("collections")
    return tuple(getattr(module, name, None) for name in ("Counter", "OrderedDict", "defaultdict"))


def _encode(value, depth: int = 0) -> str:
    """``value`` as a Python literal, if it is plain data of exact builtin types; else TypeError."""
    kind = type(value)
    if depth > _MAX_DEPTH:
        raise TypeError("nested too deeply to be plain data")
    if value is None or kind is bool or kind is float or kind is str or kind is bytes:
        return repr(value)
    if kind is int:
        return repr(value) if value.bit_length() < 8000 else hex(value)
    if kind is complex:
        return f"complex({value.real!r}, {value.imag!r})"
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        items = ", ".join(_encode(item, depth + 1) for item in value)
        if kind is list:
            return f"[{items}]"
        return f"({items},)" if kind is tuple else f"{kind.__name__}([{items}])"
    if kind is dict or kind in _stdlib_dicts():  # read with dict's own methods: overrides are ignored
        items = dict.items(value)
        return "{" + ", ".join(f"{_encode(k, depth + 1)}: {_encode(v, depth + 1)}" for k, v in items) + "}"
    raise TypeError(f"a {kind.__module__}.{kind.__qualname__} is not plain data")


def _describe(error: BaseException) -> str:
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:
        text = type(error).__name__
    return text[:_MAX_DETAILS]


def _run(code: str, steps: list, results_fd: int) -> None:
    """Run the code, then each step, writing the result lines (see step 3) to ``results_fd``."""

    def write(line: str) -> None:
        os.write(results_fd, (line.replace("\n", " ") + "\n").encode())

    namespace = {"__name__": "__main__"}
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
        write("ok")
        for kind, payload in steps:
            if kind == "exec":
                exec(payload, namespace)
                write("ok")
                continue
            for expression in payload:
                value = eval(expression, namespace)
                write("value " + _encode(value))
    except SystemExit as e:
        write(f"raise exited (SystemExit {e.code!r}) before the tests finished"[:_MAX_DETAILS])
        return
    except BaseException as e:
        write(f"raise {_describe(e)}")
        return
    write("end")


def _candidate(job: dict, mode: str, results_fd: int) -> None:
    if mode != "none":
        _drop_privileges(job, mode)
    os.closerange(3, results_fd)  # the report fd among them
    os.closerange(results_fd + 1, 1 << 16)
    # jailed, the candidate's uid (or user namespace) is its own; unjailed root is not limited
    processes = 1 if mode != "none" else 0 if os.getuid() == 0 else _user_tasks(os.getuid())
    _limit(job["limits"], processes)
    sys.addaudithook(_guard(os.path.realpath(os.getcwd())))
    try:
        _run(job["code"], job["steps"], results_fd)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass  # a full output file must not cost the results
        os._exit(0)


def main(job_dir: str, mode: str, results_fd: int, report_fd: int) -> None:
    job_path = os.path.join(job_dir, "job.marshal")
    with open(job_path, "rb") as f:
        job = marshal.load(f)
    os.remove(job_path)
    if mode != "none":
        _jail(job, os.path.join(job_dir, "root"), mode)
    pid = os.fork()
    if pid == 0:
        _candidate(job, mode, results_fd)
    os.close(results_fd)
    _supervise(pid, report_fd, job["limits"]["wall_seconds"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
