"""The sandbox: correct code passes, wrong code fails, hostile code fails cleanly and harmlessly."""

import secrets
import subprocess
from pathlib import Path

import pytest

from rlkv.tasks.sandbox import Job, Limits, extract_code, run_code, run_many

FAST = Limits(timeout=3)


def test_extract_code_prefers_the_last_python_block():
    completion = "Draft:\n```python\ndef f(): return 0\n```\nFinal:\n```python\ndef f(): return 1\n```\nDone."
    assert extract_code(completion) == "def f(): return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 2\n```\n```text\nnot code\n```") == "x = 2\n"
    assert extract_code("def f():\n    return 3") == "def f():\n    return 3"


def test_passing_failing_and_erroring_code():
    code = "def add(a, b):\n    return a + b\nprint('hello')"
    passed = run_code(code, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert passed.passed and passed.status == "passed" and passed.stdout == "hello\n"
    failed = run_code(code, ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
    assert failed.status == "failed" and "test 1 failed: assert add(1, 1) == 3" in failed.details
    assert run_code("def add(a, b) return", ["assert True"]).status == "error"
    raised = run_code("def f():\n    return 1 / 0", ["assert f() == 1"])
    assert raised.status == "error" and "ZeroDivisionError" in raised.details


def test_run_many_keeps_job_order():
    jobs = [Job(f"x = {i}", [f"assert x == {i}"]) for i in range(6)] + [Job("x = 0", ["assert x == 1"])]
    assert [r.status for r in run_many(jobs, workers=2)] == ["passed"] * 6 + ["failed"]


def test_infinite_loop_times_out():
    result = run_code("while True:\n    pass", ["assert True"], Limits(timeout=1.5))
    assert result.status == "timeout" and 1.5 <= result.seconds < 5


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nwhile True:\n    subprocess.Popen(['python3', '-c', 'pass'])",
        "import os\nos.system(':(){ :|:& };:')",
        "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
        "import ctypes\nwhile True:\n    ctypes.CDLL(None).fork()",
    ],
)
def test_fork_bombs_fail_cleanly(bomb):
    result = run_code(bomb, ["assert True"], FAST)
    assert result.status == "error" and "not allowed" in result.details


def test_allocating_50_gb_fails_cleanly():
    result = run_code("block = bytearray(50 * 2**30)", ["assert True"], FAST)
    assert result.status == "error" and "MemoryError" in result.details


def test_writing_outside_the_working_dir_is_refused():
    target = Path(f"/tmp/rlkv_escape_{secrets.token_hex(8)}")
    attempts = [
        f"open({str(target)!r}, 'w').write('escaped')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('escaped')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('escaped')",
        f"import shutil\nopen('here.txt', 'w').write('x')\nshutil.copy('here.txt', {str(target)!r})",
        f"import os\nos.chdir('/tmp')\nopen({target.name!r}, 'w').write('escaped')",
    ]
    for code in attempts:
        result = run_code(code, ["assert True"], FAST)
        assert result.status == "error" and "outside the working directory" in result.details, code
        assert not target.exists(), code


def test_deleting_outside_the_working_dir_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in [f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"]:
        assert run_code(code, ["assert True"], FAST).status == "error"
    assert victim.read_text() == "precious"


def test_files_inside_the_working_dir_are_fine_and_deleted_afterwards():
    code = "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.remove('a.txt')\n"
    code += "tempfile.mkstemp()\nprint(os.getcwd())"
    result = run_code(code, ["assert True"], FAST)
    assert result.passed, result.details
    assert not Path(result.stdout.strip()).exists()


def test_opening_a_socket_is_refused():
    code = "import socket\nsocket.create_connection(('127.0.0.1', 9))"
    result = run_code(code, ["assert True"], FAST)
    assert result.status == "error" and "socket" in result.details


def test_killing_other_processes_fails_and_they_survive():
    canary = subprocess.Popen(["sleep", "30"])
    try:
        attacks = [
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",  # the test process itself
            "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
            f"import os\nos.kill({canary.pid}, 9)",
            f"import signal\nsignal.pthread_kill({canary.pid}, 9)",
        ]
        for code in attacks:
            result = run_code(code, ["assert True"], FAST)
            assert result.status == "error" and "not allowed" in result.details, code
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


def test_exiting_before_the_tests_is_never_a_pass():
    for code in ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "quit()", "raise SystemExit"]:
        result = run_code(code, ["assert False"], FAST)
        assert result.status == "error", code


def test_no_inherited_environment_and_no_stdin(monkeypatch):
    monkeypatch.setenv("RLKV_TEST_SECRET", "hunter2")
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
    allowed.add("MKL_NUM_THREADS")
    checks = ["assert 'RLKV_TEST_SECRET' not in names", f"assert set(names) <= {allowed!r}"]
    assert run_code("import os\nnames = list(os.environ)", checks, FAST).passed  # os.environ is not plain data
    result = run_code("x = input()", ["assert True"], FAST)
    assert result.status == "error" and "EOFError" in result.details


def test_output_is_truncated():
    result = run_code("print('x' * 100_000)", ["assert True"], Limits(timeout=3, max_output_chars=100))
    assert result.passed and len(result.stdout) < 200 and result.stdout.endswith("[... truncated]")


def test_limits_cannot_be_raised_from_inside():
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"
    assert run_code(code, ["assert True"], FAST).status == "error"


def test_site_packages_are_opt_in():
    pytest.importorskip("numpy")
    code = "import numpy as np\nx = int(np.arange(10).sum())"  # a numpy integer is not plain data
    assert run_code(code, ["assert x == 45"], FAST).status == "error"
    assert run_code(code, ["assert x == 45"], Limits(timeout=10, site_packages=True)).passed
