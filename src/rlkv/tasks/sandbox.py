"""Run untrusted, model-written Python against test asserts, in a fenced child process.

:func:`run_code` writes the job to a fresh temporary directory and starts
``python -I -B -S rlkv/tasks/_sandbox_child.py <dir>`` with, as layers of defence:

* a new session (its own process group), killed as a whole with SIGKILL when the job ends,
  and a wall-clock timeout (default 10 s);
* an empty environment except a minimal PATH, HOME/TMPDIR pointing at its working dir, and
  one-thread BLAS settings: no secrets are inherited; stdin is /dev/null; ``-I -S`` keep
  user and site packages (unless ``Limits.site_packages``) and ``PYTHON*`` variables out;
* no ``preexec_fn``: it is unsafe with threads and would force a full ``fork()`` of a
  parent that may hold a model, where ``vfork`` is otherwise used;
* a fresh working directory ``<dir>/work`` (deleted afterwards), stdout/stderr captured to
  files outside it, read back truncated (memory stays bounded whatever the child prints);
* inside the child (see ``_sandbox_child``): resource limits (address space default 1 GiB,
  CPU seconds, file size, core dumps, process count for non-root users) and an audit hook
  refusing process creation, signals, sockets, ctypes and writes outside the working dir;
* a verdict that counts only if the child wrote it, with the job's nonce, after every test ran:
  exiting early (``sys.exit(0)``, ``os._exit(0)``) is an error, never a pass.

This is a guard rail against the mistakes and naive attacks found in model-generated code,
not a security boundary against a determined adversary (who could, e.g., create files with
``os.open(name, flags, dir_fd=...)``, whose audit event omits the directory; reading files
outside the working dir is allowed): run adversarial workloads inside a container or VM.
Linux only (the child resolves paths through ``/proc``). :func:`run_many` runs jobs
concurrently on a thread pool; each job is its own subprocess.
"""

from __future__ import annotations

import marshal
import math
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py"}


@dataclass(frozen=True)
class Limits:
    """What one job may use; the child gets CPU seconds equal to the wall-clock timeout."""

    timeout: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    max_processes: int = 8
    """Extra processes or threads allowed (enforced by the kernel for non-root users only)."""
    max_output_chars: int = 4000
    site_packages: bool = False
    """Let the code import installed third-party packages (numpy, ...): drops ``-S``."""


@dataclass(frozen=True)
class Job:
    """Code to run, then test statements (usually asserts) run in its namespace."""

    code: str
    tests: Sequence[str]


@dataclass(frozen=True)
class SandboxResult:
    """``status``: "passed", "failed" (an assert failed), "timeout" or "error"."""

    status: str
    details: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def extract_code(completion: str) -> str:
    """The code in a completion: its last ```python block, else its last fenced block, else all of it."""
    blocks = _FENCE.findall(completion)
    python = [code for tag, code in blocks if tag.strip().lower() in _PYTHON_TAGS]
    if python or blocks:
        return (python or [code for _, code in blocks])[-1]
    return completion


def _environment(work: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_truncated(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[... truncated]" if len(data) > limit else text


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has already exited


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``process`` to exit; True if ``timeout`` seconds passed first.

    A pidfd (Linux >= 5.3) wakes exactly at exit; ``Popen.wait(timeout)`` polls with sleeps of
    up to 50 ms, which would dominate the run time of short jobs.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return not ready
    finally:
        os.close(pidfd)


def _status_without_verdict(returncode: int | None, timed_out: bool, limits: Limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"exceeded the {limits.timeout:g} s wall-clock limit"
    if returncode == -signal.SIGXCPU:
        return "timeout", f"exceeded the {limits.timeout:g} s CPU-time limit"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return "error", f"killed by {name}"
    return "error", f"the process exited with code {returncode} before all tests ran"


def run_code(code: str, tests: Sequence[str], limits: Limits = Limits()) -> SandboxResult:
    """Run ``code`` then each of ``tests`` in a fenced child Python; never raises for bad code."""
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    child_limits = {**asdict(limits), "cpu_seconds": math.ceil(limits.timeout)}
    with tempfile.TemporaryDirectory(prefix="rlkv-sandbox-", ignore_cleanup_errors=True) as job_dir:
        root = Path(job_dir)
        work = root / "work"
        work.mkdir()
        job = {"code": code, "tests": list(tests), "nonce": nonce, "limits": child_limits}
        (root / "job.marshal").write_bytes(marshal.dumps(job))
        flags = ["-I", "-B"] if limits.site_packages else ["-I", "-B", "-S"]
        with (root / "stdout").open("wb") as stdout, (root / "stderr").open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, *flags, str(CHILD), str(root)],
                cwd=work,
                env=_environment(work),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            try:
                timed_out = _wait(process, limits.timeout)
            finally:
                _kill_group(process.pid)
                process.wait()
        try:  # written by the untrusted child: plain text, never unmarshalled
            verdict = (root / "verdict.txt").read_text(encoding="utf-8", errors="replace").split("\n", 2)
        except OSError:
            verdict = []
        if len(verdict) == 3 and verdict[0] == nonce and verdict[1] in ("passed", "failed", "error"):
            status, details = verdict[1], verdict[2]
        else:
            status, details = _status_without_verdict(process.returncode, timed_out, limits)
        return SandboxResult(
            status=status,
            details=details,
            stdout=_read_truncated(root / "stdout", limits.max_output_chars),
            stderr=_read_truncated(root / "stderr", limits.max_output_chars),
            seconds=time.monotonic() - start,
        )


def run_many(jobs: Sequence[Job], workers: int | None = None, limits: Limits = Limits()) -> list[SandboxResult]:
    """Run ``jobs`` concurrently (``workers`` default: CPU count); results in job order."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_code(job.code, job.tests, limits), jobs))
