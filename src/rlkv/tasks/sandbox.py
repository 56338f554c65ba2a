"""Run untrusted, model-written Python against test asserts, fenced in by the operating system.

:func:`run_code` starts one child per job, ``unshare <namespaces> python -I -B -S
_sandbox_child.py`` (no shell), which (see :mod:`rlkv.tasks._sandbox_child` and
:mod:`rlkv.tasks.isolation`):

* gives the job fresh PID, mount, network, IPC, UTS and cgroup namespaces and a root of its own:
  read-only ``/usr`` and Python, ``/dev/{null,zero,urandom}``, its own ``/proc``, and a private
  tmpfs ``/sandbox`` as working dir (gone with the namespace); no host path, no network, no
  other process (the grader included) is visible;
* runs the candidate as an unprivileged uid of its own (or, not root, in a user namespace)
  with no capabilities and no-new-privs, under rlimits on memory, file size, open files,
  processes and CPU seconds (``Limits.timeout`` counts CPU seconds, so verdicts do not depend
  on the machine's load; ``Limits.wall_timeout`` is a larger backstop);
* kills the whole process tree (the PID namespace dies with its init) and removes its
  directory whatever the code does;
* decides the verdict here: the child returns the values of the calls the asserts make, as
  plain data, and :mod:`rlkv.tasks.checks` compares them with the expected values, which only
  the grader evaluates.

Where the machine cannot isolate (no namespaces, not root and no user namespaces), it raises
:class:`~rlkv.tasks.isolation.SandboxUnavailable` unless ``Limits(isolation="none")`` or
``RLKV_SANDBOX_UNSAFE=1`` asks for an unisolated child. :func:`run_many` runs jobs on a
thread pool, one child each.
"""

from __future__ import annotations

import marshal
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rlkv.excerpt import excerpt
from rlkv.tasks import checks, isolation
from rlkv.tasks.isolation import SandboxUnavailable

__all__ = ["Job", "Limits", "SandboxResult", "SandboxUnavailable", "extract_code", "run_code", "run_many"]

CHILD = Path(__file__).with_name("_sandbox_child.py")
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py"}
_TIMEOUT_SIGNALS = {-signal.SIGPROF, -signal.SIGXCPU}
MAX_VALUE_CHARS = 1 << 20
"""Longest encoded value the grader decodes (bounds its own memory and time); the results channel is read
only as far as the plan's lines of this size reach."""


@dataclass(frozen=True)
class Limits:
    """What one job may use."""

    timeout: float = 10.0
    """CPU seconds of the candidate (a precise timer, then RLIMIT_CPU one second later)."""
    wall_timeout: float | None = None
    """Wall-clock backstop (for code that sleeps or blocks); default 3 * timeout + 5 s."""
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    disk_bytes: int = 64 << 20
    """Size of the private tmpfs working dir."""
    open_files: int = 256
    max_processes: int = 8
    """Extra processes or threads allowed."""
    max_output_chars: int = 4000
    site_packages: bool = False
    """Let the code import installed third-party packages (numpy, ...): drops ``-S``."""
    isolation: str = "auto"
    """"auto", "root", "user" or "none" (unsafe, see :mod:`rlkv.tasks.isolation`)."""


@dataclass(frozen=True)
class Job:
    """Code to run, then test statements (usually asserts) run against it; ``tested``: names the
    code defines that the tests call even where they shadow a builtin (see :func:`checks.plan`)."""

    code: str
    tests: Sequence[str]
    tested: Collection[str] = field(default=())


@dataclass(frozen=True)
class SandboxResult:
    """``status``: "passed", "failed" (an assert failed), "timeout" or "error"."""

    status: str
    details: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0

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


def _environment(work: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
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


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``process`` to exit; True if ``timeout`` seconds passed first (a pidfd wakes at
    exit exactly, where ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms)."""
    pidfd = os.pidfd_open(process.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return not ready
    finally:
        os.close(pidfd)


def _kill_tree(pid: int) -> None:
    """SIGKILL the child's process group: ``unshare`` and the namespace's init, whose death
    kills every process left in the namespace (in mode "none", whatever kept the group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has already exited


def _without_results(
    report: str, returncode: int, timed_out: bool, wall: float, limits: Limits, stderr: str
) -> tuple[str, str]:
    """Status and details when the child did not finish its steps."""
    if timed_out:
        return "timeout", f"exceeded the {wall:g} s wall-clock limit"
    fields = report.split()
    code = int(fields[0]) if fields else returncode
    cpu = float(fields[1]) if len(fields) > 1 else 0.0
    if code in _TIMEOUT_SIGNALS or (code == -signal.SIGKILL and cpu >= limits.timeout):
        return "timeout", f"exceeded the {limits.timeout:g} s CPU-time limit"
    if not fields:
        last = (stderr.strip().splitlines() or ["no error output"])[-1]
        return "error", f"the sandbox exited with code {returncode} before the code ran ({last})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return "error", f"killed by {name}"
    return "error", f"the process exited with code {code} before all tests ran"


def _result(line: str) -> tuple[str, str]:
    """A result line's (kind, rest): "ok", "end", "raise <message>" or "value <literal>"; ("bad", line) else."""
    kind, _, rest = line.partition(" ")
    if (kind in ("ok", "end") and not rest) or (kind in ("raise", "value") and rest):
        return kind, rest
    return "bad", line


def _results_cap(plan: checks.Plan) -> int:
    """The most bytes of result lines `plan` can use: one line per step or hole, the first and the last."""
    lines = 2 + sum(len(payload) if isinstance(payload, tuple) else 1 for _, payload in plan.steps)
    return lines * (MAX_VALUE_CHARS + len("value \n"))


def _verdict(lines: list[str], plan: checks.Plan, tests: Sequence[str]) -> tuple[str, str] | None:
    """Status and details from the child's result lines (see `_result`), comparing values here; None if the
    lines stop before the end (the child died). Whatever the candidate wrote, this costs time linear in
    the lines the plan reads (`checks.decode`)."""
    results = (_result(line) for line in lines)
    first = next(results, None)
    if first is None:
        return None
    if first[0] != "ok":
        return ("error", f"the solution raised {first[1][:2000]}") if first[0] == "raise" else _unexpected(first)
    check_of = iter(plan.checks)
    for (kind, payload), index in zip(plan.steps, plan.step_tests):
        shown = tests[index][:2000]
        if kind == "exec":
            result = next(results, None)
            if result is None:
                return None
            if result[0] != "ok":
                return "error", f"test {index} raised {result[1][:2000]}: {shown}"
            continue
        assert isinstance(payload, tuple), "an eval step's payload is its holes"
        values = []
        for _ in payload:
            result = next(results, None)
            if result is None:
                return None
            if result[0] != "value":
                return "error", f"test {index} raised {result[1][:2000]}: {shown}"
            if len(result[1]) > MAX_VALUE_CHARS:
                return "error", f"test {index}: the code returned a value over {MAX_VALUE_CHARS} characters: {shown}"
            try:
                values.append(checks.decode(result[1]))
            except ValueError as e:
                return "error", f"test {index}: the code returned a value that is {e}: {shown}"
        check = next(check_of)
        try:
            if not checks.passes(check, values):
                return "failed", f"test {index} failed: {shown}"
        except Exception as e:  # the expected side could not take the values (a TypeError ...)
            return "error", f"test {index} raised {type(e).__name__}: {e}"[:2000] + f": {shown}"
    result = next(results, None)
    if result is None:
        return None
    return ("passed", f"all {len(tests)} tests passed") if result[0] == "end" else _unexpected(result)


def _unexpected(result: tuple[str, str]) -> tuple[str, str]:
    """The error verdict of a result line out of place, quoting it as the child wrote it."""
    kind, rest = result
    line = rest if kind == "bad" else f"{kind} {rest}".strip()
    return "error", f"unexpected result line {excerpt(line, 200)!r}"


def _run(code: str, tests: Sequence[str], plan: checks.Plan, limits: Limits, mode: str) -> SandboxResult:
    start = time.monotonic()
    wall = limits.wall_timeout or 3 * limits.timeout + 5
    child_limits = {
        "timeout": limits.timeout, "cpu_seconds": math.ceil(limits.timeout) + 1, "memory_bytes": limits.memory_bytes,
        "file_bytes": limits.file_bytes, "disk_bytes": limits.disk_bytes, "open_files": limits.open_files,
        "max_processes": limits.max_processes, "wall_seconds": math.ceil(wall) + 1,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rlkv-sandbox-", ignore_cleanup_errors=True) as job_dir:
        root = Path(job_dir)
        work = root / "work" if mode == "none" else root / "root"
        work.mkdir()
        job = {
            "code": code, "steps": list(plan.steps), "limits": child_limits,
            "uid": isolation.next_uid() if mode == "root" else 0,
            "read_only": isolation.read_only_paths(limits.site_packages),
        }  # fmt: skip
        (root / "job.marshal").write_bytes(marshal.dumps(job))
        flags = ["-I", "-B"] if limits.site_packages else ["-I", "-B", "-S"]
        names = ("stdout", "stderr", "results", "report")
        files = {name: (root / name).open("w+b") for name in names}
        try:
            results_fd, report_fd = files["results"].fileno(), files["report"].fileno()
            command = [*isolation.command(mode), sys.executable, *flags, str(CHILD), job_dir, mode]
            process = subprocess.Popen(
                [*command, str(results_fd), str(report_fd)],
                cwd=work if mode == "none" else job_dir,
                env=_environment(str(work) if mode == "none" else "/sandbox"),
                stdin=subprocess.DEVNULL,
                stdout=files["stdout"],
                stderr=files["stderr"],
                pass_fds=(results_fd, report_fd),
                start_new_session=True,
            )
            try:
                timed_out = _wait(process, wall)
            finally:
                _kill_tree(process.pid)
                process.wait()
        finally:
            for f in files.values():
                f.close()
        report = _read_truncated(root / "report", 200)
        lines = _read_truncated(root / "results", min(limits.file_bytes, _results_cap(plan))).split("\n")[:-1]
        stderr = _read_truncated(root / "stderr", limits.max_output_chars)
        verdict = _verdict(lines, plan, tests) or _without_results(
            report, process.returncode, timed_out, wall, limits, stderr
        )
        fields = report.split()
        return SandboxResult(
            status=verdict[0],
            details=verdict[1],
            stdout=_read_truncated(root / "stdout", limits.max_output_chars),
            stderr=stderr,
            seconds=time.monotonic() - start,
            cpu_seconds=float(fields[1]) if len(fields) > 1 else 0.0,
        )


def _try_mode(mode: str) -> str | None:
    """None if a trivial job runs in ``mode``, else why not."""
    tests = ("assert x == 1",)
    result = _run("x = 1", tests, checks.plan(tests), Limits(timeout=10), mode)
    return None if result.passed else result.details


def _mode(limits: Limits) -> str:
    mode = isolation.requested_mode(limits.isolation)
    return isolation.probed_mode(_try_mode) if mode == "auto" else mode


def run_code(code: str, tests: Sequence[str], limits: Limits = Limits(), tested: Collection[str] = ()) -> SandboxResult:
    """Run ``code`` then ``tests`` in a sandbox; never raises for bad code (ValueError for a test
    the grader cannot split, :class:`SandboxUnavailable` where the machine cannot isolate)."""
    plan = checks.plan(tuple(tests), frozenset(tested))
    return _run(code, tests, plan, limits, _mode(limits))


def run_many(jobs: Sequence[Job], workers: int | None = None, limits: Limits = Limits()) -> list[SandboxResult]:
    """Run ``jobs`` concurrently; results in job order. ``workers`` defaults to twice the CPU
    count: a job also waits on the kernel (namespaces set up and torn down), and its limit
    counts CPU seconds, so running more jobs than cores changes no verdict."""
    mode = _mode(limits)
    plans = [checks.plan(tuple(job.tests), frozenset(job.tested)) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers or 2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job, plan: _run(job.code, job.tests, plan, limits, mode), jobs, plans))
