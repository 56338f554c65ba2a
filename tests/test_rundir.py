"""A run directory: one writer per set of samples across real processes, each sample counted once,
and files that cannot be read named with what was expected."""

import json
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from threading import Barrier

import pytest

from rlkv.eval import Shard, report, rundir
from rlkv.eval.rundir import read_jsonl, run_records, sole_writer
from rlkv.eval.summary import summarize_run

# The holder loads rundir.py by its path: importing the rlkv package would load torch (seconds per process).
HOLDER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("rundir", sys.argv[1])
rundir = sys.modules["rundir"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rundir)
shard = None if sys.argv[3] == "-" else rundir.Shard.parse(sys.argv[3])
with rundir.sole_writer(Path(sys.argv[2]), shard):
    print("held", flush=True)
    time.sleep(60)
"""


@contextmanager
def held_by_another_process(run: Path, shard: str):
    """A second process holding the run's lock as `rlkv eval --shard SHARD` (or unsharded: "-") would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, rundir.__file__, str(run), shard],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "held\n", proc.communicate(timeout=30)[1]
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def parse(spec: str) -> Shard | None:
    return None if spec == "-" else Shard.parse(spec)


@pytest.mark.parametrize(
    "held, mine", [("-", "1/2"), ("1/2", "-"), ("-", "-"), ("1/2", "1/2"), ("1/2", "1/3"), ("2/3", "2/2")]
)
def test_writers_of_the_same_samples_are_refused_at_once(tmp_path, held, mine):
    run = tmp_path / "run"
    with held_by_another_process(run, held) as proc:
        name = "an unsharded eval" if held == "-" else f"shard {held}"
        with pytest.raises(
            ValueError, match=re.escape(f"another process is running {name} into {run} (pid {proc.pid}, ")
        ) as err:
            with sole_writer(run, parse(mine)):
                pass
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("held, mine", [("1/2", "2/2"), ("2/4", "1/2"), ("3/3", "1/3")])
def test_shards_owning_other_groups_run_side_by_side(tmp_path, held, mine):
    assert not Shard.parse(held).overlaps(Shard.parse(mine))
    run = tmp_path / "run"
    with held_by_another_process(run, held):
        with sole_writer(run, parse(mine)):
            assert (run / f".lock.samples.shard-{mine.replace('/', '-of-')}").read_text().isdigit()


def test_a_dead_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    with held_by_another_process(run, "-") as proc:
        proc.kill()
        proc.wait(timeout=30)
        assert (run / ".lock.samples").read_text() == str(proc.pid)  # its lock file stays behind
        with sole_writer(run, Shard(1, 2)):
            pass
        with sole_writer(run, None):
            pass


def test_writers_starting_together_exactly_one_wins(tmp_path):
    """Taking a lock and checking the others is one step: two unsharded starts never both get through."""
    run, start, outcomes = tmp_path / "run", Barrier(8), []

    def attempt(shard):
        start.wait()
        try:
            with sole_writer(run, shard):
                outcomes.append("ran")
                start_done.wait()
        except ValueError:
            outcomes.append("refused")
            start_done.wait()

    start_done = Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(attempt, [None] * 8))
    assert sorted(outcomes) == ["ran"] + ["refused"] * 7
    outcomes.clear()
    start, start_done = Barrier(8), Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(attempt, [Shard(k, 8) for k in range(1, 9)]))
    assert outcomes == ["ran"] * 8


def sample(task="arith", method="full", sparsity=0.0, id="1", score=1.0):
    return {
        "task": task,
        "method": method,
        "sparsity": sparsity,
        "id": id,
        "completion": "",
        "tokens": 4,
        "prompt_tokens": 3,
        "finish": "eos",
        "score": score,
        "kv_bytes": 8,
        "kv_bytes_full": 8,
        "kv_bytes_mean": 6.0,
        "kv_bytes_full_mean": 6.0,
    }


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_summary_counts_each_sample_once(tmp_path):
    """An unsharded run and a shard that ran the same group at once: the first copy of each sample counts."""
    run = tmp_path / "run"
    run.mkdir()
    write(run / "samples.jsonl", [sample(id="1", score=1.0), sample(id="2", score=0.0)])
    write(
        run / "samples.shard-1-of-2.jsonl",
        [sample(id="2", score=1.0), sample(id="1", score=0.0), sample(id="3", score=1.0)],
    )
    write(run / "samples.shard-2-of-2.jsonl", [sample(method="streaming", sparsity=1.0, id="1")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples, rows = summarize_run(run)
    assert [str(w.message) for w in caught] == [
        f"{run} holds 2 repeated samples (the same task, method, sparsity and id more than once, as two processes "
        "running the same groups at once leave): each is counted once, as first read"
    ]
    assert len(samples) == 4
    full = next(r for r in rows if r["method"] == "full")
    assert full["n"] == 3 and full["accuracy"] == pytest.approx(2 / 3)  # ids 1 (1.0), 2 (0.0), 3 (1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write(run / "samples.shard-1-of-2.jsonl", [sample(id="3")])
        assert len(run_records(run, "samples")) == 4  # no repeats: no warning


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "is not valid JSON (empty file)"),
        ('{"model": "m",', "is not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
        ("[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_an_unreadable_config_is_named_with_what_was_expected(tmp_path, text, why):
    from rlkv.eval.run import _open_run

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    write(run / "samples.jsonl", [sample()])
    (run / "config.json").write_text(text)
    expected = (
        f"{run / 'config.json'} {why}: expected the run's config written by rlkv eval; "
        "remove the directory or fix the file"
    )
    for call in (lambda: report(run), lambda: _open_run(run, {}, {}, None)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == expected


def test_unreadable_samples_are_named_with_what_was_expected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    expected = "expected one JSON object per line as rlkv eval writes them; remove the file or fix it"
    path = run / "samples.jsonl"
    path.write_text('{"task": \n' + json.dumps(sample()) + "\n")
    with pytest.raises(ValueError, match=f"samples.jsonl: line 1 is not valid JSON: {expected}"):
        run_records(run, "samples")
    path.write_text("[1]\n")
    with pytest.raises(ValueError, match=f"samples.jsonl: line 1 is a JSON list: {expected}"):
        read_jsonl(path)
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match=r"samples.jsonl cannot be read \(UnicodeDecodeError"):
        read_jsonl(path)
    path.unlink()
    (run / "samples.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"samples.jsonl.gz cannot be read \(BadGzipFile"):
        read_jsonl(run / "samples.jsonl.gz")
    (run / "samples.jsonl.gz").unlink()
    write(path, [{"task": "arith", "score": 1.0}])
    with pytest.raises(ValueError, match=r"samples.jsonl: record 1 has no method, sparsity, id: expected a sample"):
        run_records(run, "samples")


def test_rlkv_eval_is_refused_before_loading_its_model(tmp_path):
    from typer.testing import CliRunner

    from rlkv.cli import app

    run, model = tmp_path / "run", tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # passes the path check; loading it would fail
    args = ["eval", "--model", str(model), "--task", "arith", "--out", str(run)]
    with held_by_another_process(run, "-") as proc:
        result = CliRunner().invoke(app, args + ["--shard", "2/2"])
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr.strip() == (
            f"error: another process is running an unsharded eval into {run} (pid {proc.pid}, appending to "
            "samples.jsonl), which would append the same samples as shard 2/2; let it finish or stop it, then run "
            "this command again to resume"
        )
    with held_by_another_process(run, "1/2"):
        result = CliRunner().invoke(app, args + ["--shard", "2/2"])
        assert "Unrecognized model" in result.stderr  # shard 2/2 may run beside 1/2: it went on to load the model
