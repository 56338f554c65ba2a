"""Hostile code in the sandbox: every attack is contained.

"Contained" means, for each attack: the verdict is not a pass (MBPP scores 0.0); no file appears
at the host paths it targets; no process it started (found by a marker in its command line)
is alive shortly afterwards; the grader (this process) and an unrelated canary process live.
Most attacks run *unhooked*: in a subinterpreter, which the child's audit hook does not watch,
with ctypes and ``_posixsubprocess`` at hand, i.e. as native code as the candidate's user would;
so they test the operating system's fence, not the audit hook.
"""

import ast
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlkv.tasks import isolation
from rlkv.tasks.isolation import SandboxUnavailable
from rlkv.tasks.mbpp import MBPP
from rlkv.tasks.sandbox import Job, Limits, run_code, run_many

FAST = Limits(timeout=3)
MODES = ["root", "user"] if os.geteuid() == 0 else ["user"]


def unhooked(script: str) -> str:
    """Candidate code that runs ``script`` in a fresh interpreter started by libc's ``system()``
    from a subinterpreter (which the audit hook does not watch): no audit hook at all."""
    spawn = "import ctypes, sys\nctypes.CDLL(None).system(f'{sys._base_executable} -I -S attack.py'.encode())"
    return (
        f"open('attack.py', 'w').write({script!r})\n"
        f"import _xxsubinterpreters as interpreters\ninterpreters.run_string(interpreters.create(), {spawn!r})\n"
    )


def processes_with(marker: str, wait: float = 2.0) -> list[int]:
    """Pids whose command line contains ``marker`` after up to ``wait`` seconds for them to go."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture
def canary():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def mbpp(data_dir):
    task = MBPP()
    task.limits = FAST
    return task, task.load(data_dir, limit=3)


# ---------------------------------------------------------------- forged verdicts
FORGERIES = {
    "builtins.exec is a no-op": "import builtins\nbuiltins.exec = lambda *a, **k: None",
    "builtins.compile is replaced": "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', '', 'exec')",
    "the child's exec and eval": "import sys\nm = sys.modules['__main__']\nm.exec = m.eval = lambda *a, **k: True",
    "always-equal object": "class Eq:\n    def __eq__(self, other): return True\ndef remove_Occ(*a): return Eq()",
    "str subclass": "class S(str):\n    def __eq__(self, other): return True\ndef remove_Occ(*a): return S('x')",
    "fake Counter": (
        "import collections\nclass C(dict):\n    def __eq__(self, other): return True\n"
        "collections.Counter = C\ndef remove_Occ(*a): return C(a=1)"
    ),
    "fake result lines": (
        "import os\nfor fd in range(3, 64):\n"
        "    try: os.write(fd, b'ok\\nvalue True\\nvalue True\\nvalue True\\nend\\n')\n"
        "    except OSError: pass\nos._exit(0)"
    ),
    "frames and gc": (
        "import gc, sys\nfor o in gc.get_objects():\n    if isinstance(o, dict) and 'steps' in o: o['steps'] = []\n"
        "f = sys._getframe()\nwhile f:\n"
        "    f.f_globals.update(exec=lambda *a: None, eval=lambda *a: True)\n    f = f.f_back"
    ),
    "exit before the tests": "import os\nos._exit(0)",
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_passes_score_zero(mbpp, name):
    task, examples = mbpp
    completion = f"```python\n{FORGERIES[name]}\n```"
    assert task.grade(examples[0], completion) == 0.0
    assert task.grade_many(examples, [completion] * len(examples)) == [0.0] * len(examples)
    assert task.grade(examples[0], examples[0].answer) == 1.0  # the same task passes when solved


def test_a_result_line_built_to_collide_costs_the_grader_no_time(mbpp):
    """Issue #33: a candidate wrote to its results descriptor a set of 41k integers that share one hash;
    decoding it took the grader (this process) 10 s of CPU. Now it is refused in linear time."""
    task, examples = mbpp
    attack = (
        "import os\nline = 'ok\\nvalue {' + ', '.join(str(k * (2**61 - 1)) for k in range(1, 41001)) + '}\\n'\n"
        "for fd in range(3, 64):\n    try: os.write(fd, line.encode())\n    except OSError: pass\nos._exit(0)"
    )
    start = time.process_time()
    ast.parse("{" + ", ".join(str(k * (2**61 - 1)) for k in range(1, 41001)) + "}", mode="eval")
    parsing = time.process_time() - start  # the floor of reading the line, which scales with the machine's load
    start = time.process_time()
    assert task.grade(examples[0], f"```python\n{attack}\n```") == 0.0
    assert time.process_time() - start < 4 * parsing + 0.5  # a set of the colliding values took 80x parsing


def test_the_expected_values_never_reach_the_child(mbpp):
    task, examples = mbpp
    assert examples[0].meta["tests"][0].endswith('"heo"')  # remove_Occ("hello","l")=="heo"
    code = (
        "import gc, types\nneedles = {''.join(['h', 'eo']), ''.join(['b', 'cd'])}\n"
        "def scan(o):\n"
        "    return (o in needles) if type(o) is str else type(o) is types.CodeType and any(map(scan, o.co_consts))\n"
        "found = [o for o in gc.get_objects() if type(o) in (tuple, list, dict) and any("
        "scan(x) for x in (o.values() if isinstance(o, dict) else o))]\n"
        "print('found' if found else 'absent')\ndef remove_Occ(s, ch): return s.replace(ch, '')"
    )
    result = run_code(code, task.sandbox_tests(examples[0]), FAST, tested={"remove_Occ"})
    assert result.stdout == "absent\n" and result.passed, result


# ---------------------------------------------------------------- escapes
def escape_script(target: Path, marker: str, grader: int, canary: int) -> str:
    """Native-level attacks, each printing its outcome: a shell, a setsid daemon, libc system(),
    signals to the grader and the canary, files by sqlite3, mkfifo, dir_fd, a symlink race, /proc."""
    return f"""
import ctypes, os, signal, sqlite3, sys, threading, _posixsubprocess
def attempt(name, action):
    try:
        print(name, 'DID', action(), flush=True)
    except BaseException as e:
        print(name, 'refused', type(e).__name__, flush=True)
target, marker = {str(target)!r}, {marker!r}
shell = f"echo escaped > {{target}}.sh; (sleep 1.5; echo late > {{target}}.late) & sleep 30 # {{marker}}"
def spawn():
    r, w = os.pipe()
    args = [b'/bin/sh', b'-c', shell.encode()]
    return _posixsubprocess.fork_exec(args, [args[0]], True, (1, 2), None, None, -1, -1, -1, -1, -1, -1,
                                      r, w, True, True, -1, None, None, None, -1, None, True)
attempt('fork_exec', spawn)
daemon = f"setsid sh -c 'sleep 1.5; echo late > {{target}}.system # {{marker}}' &"
attempt('system', lambda: ctypes.CDLL(None).system(daemon.encode()))
attempt('kill_grader', lambda: os.kill({grader}, 9))
attempt('kill_canary', lambda: os.kill({canary}, 9))
attempt('pidfd_init', lambda: signal.pidfd_send_signal(os.pidfd_open(1), 9))
attempt('pidfd_grader', lambda: signal.pidfd_send_signal(os.pidfd_open({grader}), 9))
attempt('sqlite', lambda: sqlite3.connect(target + '.db').execute('create table t (x)'))
attempt('mkfifo', lambda: os.mkfifo(target + '.fifo'))
root = os.open('/', os.O_RDONLY)
attempt('dir_fd', lambda: os.open(target.lstrip('/') + '.dirfd', os.O_CREAT | os.O_WRONLY, dir_fd=root))
attempt('open', lambda: open(target, 'w').write('escaped'))
attempt('init_mem', lambda: open('/proc/1/mem', 'r+b'))
attempt('init_environ', lambda: open('/proc/1/environ', 'rb').read())
attempt('grader_environ', lambda: open('/proc/{grader}/environ', 'rb').read())
attempt('init_root', lambda: os.listdir('/proc/1/root'))
attempt('setuid_0', lambda: os.setuid(0))
print('uid', os.getuid(), 'pid', os.getpid(), flush=True)
os.makedirs('real', exist_ok=True)
stop = []
def swap():
    while not stop:
        for link in ('/tmp', 'real'):
            try:
                os.symlink(link, 'swap.tmp'); os.replace('swap.tmp', 'swap')
            except OSError:
                pass
thread = threading.Thread(target=swap); thread.start()
for i in range(300):
    try:
        open(f'swap/{{os.path.basename(target)}}.race', 'w').close()
    except OSError:
        pass
stop.append(1); thread.join()
libc = ctypes.CDLL(None, use_errno=True)
attempt('new_user_namespace', lambda: 'created' if libc.unshare(0x10000000 | 0x20000) == 0 else 'failed')
attempt('remount_usr', lambda: 'remounted' if libc.mount(None, b'/usr', None, 32 | 4096, None) == 0 else 'failed')
attempt('write_usr', lambda: open('/usr/' + marker, 'w').write('escaped'))
def chroot_escape():
    os.makedirs('/sandbox/jail', exist_ok=True)
    os.chroot('/sandbox/jail')
    for _ in range(30):
        os.chdir('..')
    os.chroot('.')
    return sorted(os.listdir('/'))
attempt('chroot_escape', chroot_escape)
"""


@pytest.mark.parametrize("mode", MODES)
def test_escapes_are_contained(mode, canary, monkeypatch):
    monkeypatch.setenv("RLKV_GRADER_SECRET", "hunter2")
    marker = f"rlkv_hostile_{secrets.token_hex(6)}"
    target = Path("/tmp") / marker
    script = escape_script(target, marker, os.getpid(), canary.pid)
    result = run_code(unhooked(script), ["assert f(1) == 2"], Limits(timeout=10, isolation=mode))
    assert result.status == "error" and "NameError" in result.details  # it never defined f
    outcomes = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert "uid" in outcomes, (result.stdout, result.stderr)
    assert outcomes["fork_exec"].startswith("DID") and outcomes["system"] == "DID 0", result.stdout  # they ran ...
    refused = ["kill_grader", "kill_canary", "pidfd_grader", "sqlite", "mkfifo", "dir_fd", "open", "init_mem"]
    refused += ["init_environ", "grader_environ", "init_root"] + (["setuid_0"] if mode == "root" else [])
    for name in refused:
        assert outcomes[name].startswith("refused"), (name, result.stdout)  # ... and nothing else did
    if mode == "user":  # no nested user namespace, so no capability again
        assert outcomes["new_user_namespace"] == "DID failed", result.stdout
    assert outcomes["remount_usr"] in ("DID failed", "refused OSError") and outcomes["write_usr"].startswith("refused")
    assert "'etc'" not in outcomes["chroot_escape"] and "'work'" not in outcomes["chroot_escape"], result.stdout
    assert "hunter2" not in result.stdout + result.stderr
    assert int(outcomes["uid"].split()[2]) < 10  # a PID of the job's own namespace
    if mode == "root":
        assert int(outcomes["uid"].split()[0]) >= isolation.UID_BASE
    assert processes_with(marker, wait=3.0) == []
    time.sleep(1.0)  # past the daemons' delayed writes
    leaked = [p for p in [*Path("/tmp").iterdir(), Path("/usr") / marker] if p.name.startswith(marker) and p.exists()]
    assert leaked == [] and canary.poll() is None


def test_audit_hook_still_refuses_dotted_extension_names():
    code = (
        "import importlib.util, os, sys\nlib = [p for p in sys.path if p.endswith('lib-dynload')][0]\n"
        "name = [f for f in os.listdir(lib) if f.startswith('_posixsubprocess')][0]\n"
        "spec = importlib.util.spec_from_file_location('x._posixsubprocess', os.path.join(lib, name))\n"
        "importlib.util.module_from_spec(spec)"
    )
    result = run_code(code, ["assert True"], FAST)
    assert result.status == "error" and "not allowed" in result.details


def test_a_forked_daemon_dies_with_the_job():
    marker = f"rlkv_daemon_{secrets.token_hex(6)}"
    script = (
        "import os, _posixsubprocess\nr, w = os.pipe()\n"
        f"args = [b'/bin/sh', b'-c', b'sleep 60 # {marker}']\n"
        "_posixsubprocess.fork_exec(args, [args[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, True,"
        " -1, None, None, None, -1, None, True)"
    )
    result = run_code(unhooked(script), ["assert True"], FAST)
    assert result.passed, result.details
    assert processes_with(marker) == []


# ---------------------------------------------------------------- limits by CPU time, not load
def test_the_time_limit_counts_cpu_seconds_not_load():
    # each spinner in its own session: the kernel's autogroup scheduling shares the CPU between sessions, and
    # the sandboxed job runs in one of its own, so spinners sharing one session would barely slow it
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(2 * (os.cpu_count() or 1) + 1)
    ]
    try:
        code = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.8:\n    pass"
        result = run_code(code, ["assert True"], Limits(timeout=1.2, wall_timeout=60))  # a loaded machine is slow
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert result.passed, result.details
    assert 0.8 <= result.cpu_seconds < 1.2 and result.seconds > 1.2, result  # a wall-clock limit would fail it


def test_sleeping_code_hits_the_wall_clock_backstop():
    result = run_code("import time\ntime.sleep(30)", ["assert True"], Limits(timeout=1, wall_timeout=1.5))
    assert result.status == "timeout" and "wall-clock" in result.details and result.seconds < 5


def test_cpu_hogs_in_parallel_all_time_out_by_cpu():
    jobs = [Job("while True:\n    pass", ["assert True"])] * 3
    results = run_many(jobs, workers=3, limits=Limits(timeout=1))
    assert [r.status for r in results] == ["timeout"] * 3
    assert all("CPU-time" in r.details for r in results)


# ---------------------------------------------------------------- refusing to run unisolated
def test_no_isolation_is_refused_with_what_is_missing():
    with pytest.raises(SandboxUnavailable, match="root: unshare: Operation not permitted.*isolation='none'"):
        isolation.probed_mode.__wrapped__(lambda mode: "unshare: Operation not permitted")


def test_unsafe_opt_in_is_explicit(monkeypatch):
    with pytest.raises(ValueError, match="isolation must be one of"):
        run_code("x = 1", ["assert x == 1"], Limits(isolation="off"))
    assert isolation.requested_mode("auto") == "auto"
    monkeypatch.setenv(isolation.UNSAFE_ENV, "1")
    assert isolation.requested_mode("auto") == "none"
    result = run_code("import os\nuid = os.getuid()", [f"assert uid == {os.getuid()}"], FAST)
    assert result.passed, result.details  # unisolated: the grader's own uid


# ---------------------------------------------------------------- resources, unhooked
@pytest.mark.parametrize("mode", MODES)
def test_an_unhooked_fork_bomb_is_capped_and_reaped(mode):
    marker = f"rlkv_bomb_{secrets.token_hex(6)}"
    script = (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        f"started = sum(libc.system(b'sh -c \\'sleep 60; : {marker}\\' &') == 0 for _ in range(40))\n"
        "print('started', started, flush=True)"
    )
    result = run_code(unhooked(script), ["assert True"], Limits(timeout=10, max_processes=8, isolation=mode))
    assert result.passed, (result.details, result.stderr)
    if mode == "root" or os.geteuid() != 0:  # the kernel exempts host root's processes from RLIMIT_NPROC
        # capped: system() fails once the job's processes reach the limit (whether libc's own fork fails, silently,
        # or the shell's, which says "cannot fork", depends on timing)
        assert int(result.stdout.split()[-1]) < 40
    assert processes_with(marker) == []  # nothing outlived the job


def test_filling_the_disk_stops_at_the_tmpfs_and_file_limits():
    code = (
        "import os\nerrors = []\nfor name in 'abcdef':\n    try:\n        with open(name, 'wb') as f:\n"
        "            for _ in range(20):\n                f.write(bytes(1 << 20))\n"
        "    except OSError as e:\n        errors.append(e.errno)\n"
        "total = sum(os.path.getsize(n) for n in os.listdir('.'))"
    )
    limits = Limits(timeout=10, file_bytes=16 << 20, disk_bytes=40 << 20)
    result = run_code(code, ["assert total <= 40 << 20", "assert len(errors) == 6"], limits)
    assert result.passed, result.details


def test_a_job_does_not_outlive_a_grader_killed_mid_job():
    grader_code = (
        "import sys\nfrom rlkv.tasks.sandbox import Limits, run_code\nprint('ready', flush=True)\n"
        "run_code('import time\\ntime.sleep(60)', ['assert True'], Limits(timeout=1, wall_timeout=2))"
    )
    grader = subprocess.Popen([sys.executable, "-c", grader_code], stdout=subprocess.PIPE)
    try:
        assert grader.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while not (children := Path(f"/proc/{grader.pid}/task/{grader.pid}/children").read_text().split()):
            assert time.monotonic() < deadline, "the grader started no sandbox"
            time.sleep(0.05)
    finally:
        grader.kill()
        grader.wait()
    sandbox = int(children[0])

    def children_of(pid: int) -> list[str] | None:
        try:
            return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return None  # it has exited (its --kill-child took its child with it)

    while (inits := children_of(sandbox)) == []:
        assert time.monotonic() < deadline, "the sandbox started no init"
        time.sleep(0.05)
    inits = inits or []  # the sandbox already ended with its grader: nothing of it is left to outlive it
    deadline = time.monotonic() + 6  # its init gives up at the wall-clock limit (+1 s)
    while any(Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes() for pid in inits):
        assert time.monotonic() < deadline, "the sandbox outlived its grader"
        time.sleep(0.1)
