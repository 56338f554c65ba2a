"""How the sandbox fences a job in with the operating system, and whether this machine can.

Modes (:attr:`rlkv.tasks.sandbox.Limits.isolation`):

* ``"root"``: the grader runs as root; each job gets fresh PID, mount, network, IPC, UTS and
  cgroup namespaces (util-linux ``unshare``) and its candidate runs as a uid/gid of its own
  (from :data:`UID_BASE` up, no supplementary groups) with no capabilities;
* ``"user"``: the grader is not root; the same namespaces inside a new user namespace
  (``unshare --user --map-root-user``), the candidate keeping no capability in it and unable
  to create further user namespaces;
* ``"auto"`` (default): "root" when running as root, else "user", probed once per process by
  running a trivial job; if neither works, :class:`SandboxUnavailable` names what is missing;
* ``"none"``: no isolation (a plain child process with resource limits and an audit hook),
  only when asked for explicitly, with ``isolation="none"`` or ``RLKV_SANDBOX_UNSAFE=1``.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import sys
from collections.abc import Callable

MODES = ("auto", "root", "user", "none")
UNSAFE_ENV = "RLKV_SANDBOX_UNSAFE"
UID_BASE = 3_000_000_000
"""Jobs run as uid = gid = UID_BASE + (grader pid % 10^5) * 10^4 + (job count % 10^4): a uid
per job, so RLIMIT_NPROC counts only that job's processes and jobs cannot signal each other."""
_NAMESPACES = (
    "--pid",
    "--fork",
    "--kill-child",
    "--net",
    "--ipc",
    "--uts",
    "--mount",
    "--cgroup",
    "--propagation=private",
)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_jobs = itertools.count()


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate untrusted code, and no unsafe opt-in was given."""


def next_uid() -> int:
    return UID_BASE + (os.getpid() % 100_000) * 10_000 + next(_jobs) % 10_000


def command(mode: str) -> list[str]:
    """The ``unshare`` prefix that starts the child in ``mode``'s namespaces (empty for "none")."""
    if mode == "none":
        return []
    user = ["--user", "--map-root-user"] if mode == "user" else []
    return [_unshare(), *user, *_NAMESPACES]


@functools.cache
def _unshare() -> str:
    return shutil.which("unshare") or "/usr/bin/unshare"


@functools.cache
def read_only_paths(site_packages: bool) -> tuple[str, ...]:
    """What the jailed child sees read-only: /usr (and /bin, /lib ... or links to them), Python."""
    prefixes = [sys.base_prefix, sys.base_exec_prefix] + ([sys.prefix, sys.exec_prefix] if site_packages else [])
    paths = [path for path in _SYSTEM_DIRS if os.path.lexists(path)]
    for prefix in map(os.path.realpath, prefixes):
        if not any(prefix == path or prefix.startswith(path + "/") for path in paths):
            paths.append(prefix)
    return tuple(paths)


def requested_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"sandbox isolation must be one of {', '.join(MODES)}, got {mode!r}")
    return "none" if os.environ.get(UNSAFE_ENV) == "1" else mode


@functools.cache
def probed_mode(try_mode: Callable[[str], str | None]) -> str:
    """The mode "auto" means here: the first of "root" (if root) and "user" that runs a trivial
    job (``try_mode`` returns None on success, else why it failed); cached for the process."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the sandbox needs Linux namespaces; this is {sys.platform} ({_OPT_IN})")
    if shutil.which("unshare") is None and not os.path.exists("/usr/bin/unshare"):
        raise SandboxUnavailable(f"the sandbox needs util-linux's unshare, not found on PATH ({_OPT_IN})")
    failures = []
    for mode in (["root"] if os.geteuid() == 0 else []) + ["user"]:
        error = try_mode(mode)
        if error is None:
            return mode
        failures.append(f"{mode}: {error}")
    hint = "" if os.geteuid() == 0 else _USERNS_HINT
    raise SandboxUnavailable(f"cannot isolate untrusted code here ({'; '.join(failures)}){hint} ({_OPT_IN})")


_USERNS_HINT = (
    "; not root, so it needs unprivileged user namespaces"
    " (sysctl user.max_user_namespaces > 0, and kernel.unprivileged_userns_clone = 1 where that exists)"
)
_OPT_IN = f"to run it without isolation anyway, which is unsafe, pass Limits(isolation='none') or set {UNSAFE_ENV}=1"
