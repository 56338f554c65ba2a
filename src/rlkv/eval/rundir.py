"""A run directory of `rlkv eval` on disk: its files, who may write them, and reading them back.

- config.json   what was run (model, head-file hash, method parameters, seed, versions, device);
- samples.jsonl one line per graded sample, appended as batches finish: prompt id, completion,
                tokens generated, finish reason (eos / length / repetition), score, KV bytes;
- batches.jsonl wall time and tokens of every generated batch (for tokens/s);
- summary.json  the aggregates, rewritten at the end.

One run can be split over concurrent processes (`Shard`, `rlkv eval --shard K/N`): shard K of N
takes every N-th (task, method, sparsity) group and appends to its own samples.shard-K-of-N.jsonl
and batches.shard-K-of-N.jsonl, so no two processes write one file. Whatever reads a run reads
all of its files (`run_records`). Two processes that would append the same samples (an unsharded
one and any shard, or shards whose groups overlap) never run at once (`sole_writer`).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import re
import uuid
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KEY_FIELDS = ("task", "method", "sparsity", "id")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1-based) of one run: the groups g with g % count == index - 1.

    Groups are numbered in `evaluate`'s order over every group of the run, finished or not, so a
    shard owns the same groups on every resume; the N shards of a run need the same command.
    """

    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise ValueError(f"a shard is K of N with 1 <= K <= N, got {self.index} of {self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """ "2/8" -> Shard(2, 8)."""
        match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise ValueError(f"--shard expects K/N with 1 <= K <= N, got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def owns(self, group: int) -> bool:
        return group % self.count == self.index - 1

    def overlaps(self, other: Shard) -> bool:
        """Whether some group belongs to both (by the Chinese remainder theorem: 1/2 and 1/3 share group 0)."""
        return (self.index - other.index) % math.gcd(self.count, other.count) == 0

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def own_file(out: Path, kind: str, shard: Shard | None) -> Path:
    """Where this process appends `kind` ("samples" or "batches"): kind.jsonl, or its shard's file."""
    return out / (f"{kind}.jsonl" if shard is None else f"{kind}.shard-{shard.index}-of-{shard.count}.jsonl")


def _holder_name(shard: Shard | None) -> str:
    return f"shard {shard}" if shard else "an unsharded eval"


def _lock_path(out: Path, shard: Shard | None) -> Path:
    return out / f".lock.{own_file(out, 'samples', shard).stem}"


def _lock_files(out: Path):
    """(shard or None, path) of every writer's lock file in `out`, held now or left by a finished process."""
    for path in out.glob(".lock.samples*"):
        match = re.fullmatch(r"\.lock\.samples(?:\.shard-([0-9]+)-of-([0-9]+))?", path.name)
        if match:
            yield (Shard(int(match[1]), int(match[2])) if match[1] else None), path


def _is_held(path: Path) -> bool:
    """Whether a live process holds the flock on `path` (a dead one's lock went with it)."""
    with path.open("a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _refuse_if_busy(out: Path, shard: Shard | None) -> None:
    """Raise if a live process writes samples that `shard` (None: unsharded, every group) would write too."""
    for other, path in _lock_files(out):
        if (shard is None or other is None or shard.overlaps(other)) and _is_held(path):
            _refuse(out, shard, other, path)


def _refuse(out: Path, shard: Shard | None, other: Shard | None, path: Path):
    pid = path.read_text().strip() or "?"
    raise ValueError(
        f"another process is running {_holder_name(other)} into {out} (pid {pid}, appending to "
        f"{own_file(out, 'samples', other).name}), which would append the same samples as "
        f"{_holder_name(shard)}; let it finish or stop it, then run this command again to resume"
    )


@contextmanager
def sole_writer(out: Path, shard: Shard | None):
    """Hold the samples this process appends (its shard's groups, or every group unsharded) while it runs.

    A second process on the same groups would cut the first one's line being written as a torn
    tail and append duplicates of its samples, so it is refused at once: an unsharded eval
    conflicts with every other writer, shard K/N with the shards owning one of its groups; the
    shards of one N run side by side. Each writer holds a flock on its own lock file, which goes
    with the process however it ends; taking it and checking the others happens under the run's
    `.lock`, so two processes starting together cannot both miss each other.
    """
    _check_readable(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = _lock_path(out, shard)
    with (out / ".lock").open("a") as guard, mine.open("a+") as lock:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            _refuse_if_busy(out, shard)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a holder that took it without the guard
                _refuse(out, shard, shard, mine)
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
        yield


def check_run_dir(out: Path, shard: Shard | None = None) -> None:
    """Refuse an --out that cannot take this writer: a file, a run whose config.json cannot be read, or a run
    another process is writing the same samples into now (`sole_writer` decides; this finds it before any work)."""
    _check_readable(out)
    if out.is_dir():
        with (out / ".lock").open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_SH)  # a probe while a writer takes its lock would make it fail
            _refuse_if_busy(out, shard)


def _check_readable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: expected a run directory to create or resume (--out)")
    read_config(out)


def read_config(out: Path) -> dict | None:
    """A run's config.json (None if there is none), or one line saying why it cannot be read."""
    path = out / "config.json"
    if not path.is_file():
        return None
    fix = "expected the run's config written by rlkv eval; remove the directory or fix the file"
    text = path.read_text(errors="replace")
    if not text.strip():
        raise ValueError(f"{path} is not valid JSON (empty file): {fix}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: {fix}")
    return config


def read_jsonl(path: Path) -> list[dict]:
    """Records of a results file; a torn last line (a run killed mid-write, or a shard writing now) is ignored."""
    if not path.is_file():
        return []
    expected = "expected one JSON object per line as rlkv eval writes them; remove the file or fix it"
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = data.decode().splitlines()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err.__class__.__name__}: {err}): {expected}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}: line {number} is not valid JSON: {expected}") from None
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}: {expected}")
        records.append(record)
    return records


def sample_key(sample: dict) -> tuple:
    return (sample["task"], sample["method"], float(sample["sparsity"]), str(sample["id"]))


def run_records(out: str | Path, kind: str) -> list[dict]:
    """Every record of `kind` ("samples" or "batches") in a run: kind.jsonl, then each shard's file.

    Any of them may be gzipped (`gzip -9 OUT/*.jsonl` archives a finished run at a fifth of the
    size; reports read it as before); a file present both plain and gzipped is refused, not counted twice.
    A sample found more than once (the same task, method, sparsity and id) counts once, as first read.
    """
    out = Path(out)
    shards = [*out.glob(f"{kind}.shard-*.jsonl"), *out.glob(f"{kind}.shard-*.jsonl.gz")]
    paths = [p for p in (out / f"{kind}.jsonl", out / f"{kind}.jsonl.gz") if p.is_file()]
    paths += sorted(shards, key=lambda p: p.name)
    for p in paths:
        if p.suffix == ".gz" and p.with_suffix("") in paths:
            raise ValueError(f"{out} holds both {p.with_suffix('').name} and {p.name}: remove one")
    records = [(path, number, r) for path in paths for number, r in enumerate(read_jsonl(path), 1)]
    return _distinct_samples(out, records) if kind == "samples" else [r for *_, r in records]


def _distinct_samples(out: Path, records: list[tuple[Path, int, dict]]) -> list[dict]:
    """Each sample once (the first read); one warning for all the repeats."""
    seen: dict[tuple, dict] = {}
    repeats = 0
    for path, number, record in records:
        missing = [k for k in KEY_FIELDS if k not in record]
        if missing:
            raise ValueError(
                f"{path}: record {number} has no {', '.join(missing)}: expected a sample written by "
                "rlkv eval (task, method, sparsity, id, completion, score, ...)"
            )
        key = sample_key(record)
        if key in seen:
            repeats += 1
        else:
            seen[key] = record
    if repeats:
        warnings.warn(
            f"{out} holds {repeats} repeated samples (the same task, method, sparsity and id more than "
            "once, as two processes running the same groups at once leave): each is counted once, "
            "as first read",
            stacklevel=3,
        )
    return list(seen.values())


def write_whole(path: Path, text: str) -> None:
    """Write `path` by renaming a uniquely named file onto it: a reader or another writer never sees it torn."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (left by a kill mid-write) so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
