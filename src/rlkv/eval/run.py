"""The evaluation run loop: (task x method x sparsity) -> graded samples on disk -> aggregates.

A run lives in one directory (`rlkv.eval.rundir`: config.json, samples, batches, summary.json).
An interrupted run resumes: finished samples are read back and skipped. A directory holding a
run of another configuration is refused rather than mixed. config.json is rewritten under a lock,
summary.json replaced whole, so shards that start and finish together leave every file intact.

Everything that can be wrong with the inputs (task names, data files, head files, chat
template) is checked before the directory is touched, so a bad call leaves nothing half-written.
The steps: load the examples, plan the methods (`rlkv.eval.plan`), record the run's identity and
this invocation, then each group's pending examples through `rlkv.eval.samples`, graded and
appended as batches finish, and the aggregates (`rlkv.eval.summary`).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

import rlkv.tasks as task_registry
from rlkv.engine.sampling import stable_seed
from rlkv.eval.config import BEFORE_IT_EXISTED, IDENTITY, EvalConfig
from rlkv.eval.plan import bytes_reference, matched, method_plan
from rlkv.eval.report import markdown_table
from rlkv.eval.rundir import (
    Shard,
    drop_torn_tail,
    own_file,
    read_config,
    run_records,
    sample_key,
    sole_writer,
    write_whole,
)
from rlkv.eval.samples import generate_samples
from rlkv.eval.summary import summarize_run, write_summary
from rlkv.models import Layout
from rlkv.tasks.base import Task
from rlkv.version import __version__


@dataclass
class EvalResults:
    out: Path
    rows: list[dict]
    samples: list[dict]

    def table(self) -> str:
        return markdown_table(self.rows)


@dataclass
class _Group:
    """One (task, method, sparsity) of the run, with its examples still to generate."""

    task: Task
    name: str
    sparsity: float
    method: Any  # a built method; None: a token-dropping method whose budget is matched first
    pending: list


def evaluate(
    model,
    tokenizer,
    config: EvalConfig,
    out: str | Path,
    progress: bool = True,
    examples: dict | None = None,
    shard: Shard | None = None,
) -> EvalResults:
    """Generate, grade and record every (task, method, sparsity) group of `config` under `out`.

    `examples` ({task name: [Example]}) replaces loading a task's data (e.g. a held-out slice).
    `shard` runs only that shard's groups; the results returned are all the run's at the end.
    """
    out = Path(out)
    layout = Layout.of(model)
    tasks, examples = _load_examples(config, tokenizer, examples or {})
    plan = method_plan(config, layout)
    record, invocation = _identity(model, config, layout, plan, shard)
    with sole_writer(out, shard):  # before _open_run, which truncates this process's files' torn tails
        done = _open_run(out, record, invocation, shard)
        todo = _todo(tasks, examples, plan, done, shard)
        bar = tqdm(total=sum(len(g.pending) for g in todo), desc="eval", disable=not progress, dynamic_ncols=True)
        for group in todo:
            if group.pending:
                _run_group(model, tokenizer, config, group, examples[group.task.name], done, out, shard, bar)
        bar.close()
        samples, rows = summarize_run(out)  # every process's, as they are now
        write_summary(out, record, rows)
        return EvalResults(out, rows, samples)


def _load_examples(config: EvalConfig, tokenizer, given: dict) -> tuple[dict, dict]:
    """The tasks by name and their examples (`given` ones first), each checked to prompt with `tokenizer`."""
    tasks = {name: task_registry.get(name) for name in config.tasks}
    examples = {
        name: given[name][: config.limit] if name in given else task.load(config.data_dir, limit=config.limit)
        for name, task in tasks.items()
    }
    for name, task in tasks.items():
        if not examples[name]:
            raise ValueError(f"task {name!r} has no examples (limit={config.limit})")
        task.prompt(examples[name][0], tokenizer)  # refuses a tokenizer without a chat template
    return tasks, examples


def _identity(model, config: EvalConfig, layout: Layout, plan: list, shard: Shard | None) -> tuple[dict, dict]:
    """The run's identity (config.json, shared by every invocation) and this invocation's record."""
    settings = asdict(config)
    record = {
        "model": getattr(model.config, "_name_or_path", None),
        "layout": layout.to_dict(),
        "heads_sha256": {n: m.params["heads_sha256"] for n, _, m in plan if m and "heads_sha256" in m.params},
        **{k: settings[k] for k in IDENTITY if k in settings},
    }
    invocation = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **settings,
        "method_params": [
            m.describe() if m else {"method": n, "sparsity": sp, "budget": "matched"} for n, sp, m in plan
        ],
        "environment": _environment(model),
        "shard": str(shard) if shard else None,
    }
    return record, invocation


def _todo(tasks: dict, examples: dict, plan: list, done: dict, shard: Shard | None) -> list[_Group]:
    """This process's groups with their unfinished examples, budgets to match last.

    Groups are numbered over every group of the run (what a shard owns); budgets to match come last
    in the order of the work, not of the numbering: by then this process's head-split groups are
    done, and the other shards have had the most time to finish theirs.
    """
    groups = [(task, name, sparsity, method) for task in tasks.values() for name, sparsity, method in plan]
    todo = [
        _Group(
            task,
            name,
            sparsity,
            method,
            [e for e in examples[task.name] if (task.name, name, sparsity, e.id) not in done],
        )
        for g, (task, name, sparsity, method) in enumerate(groups)
        if shard is None or shard.owns(g)
    ]
    return sorted(todo, key=lambda group: group.method is None)


def _run_group(
    model, tokenizer, config: EvalConfig, group: _Group, examples: list, done: dict, out: Path, shard: Shard | None, bar
) -> None:
    """Generate, grade and append the group's pending examples, batch by batch."""
    task, name, sparsity, method = group.task, group.name, group.sparsity, group.method
    matched_to = None
    if method is None:
        matched_to = bytes_reference(config.methods)
        method = matched(name, task.name, sparsity, {str(e.id) for e in examples}, config, Layout.of(model), out)
    prompts = {e.id: task.prompt(e, tokenizer) for e in group.pending}
    lengths = {i: len(tokenizer(p, add_special_tokens=False).input_ids) for i, p in prompts.items()}
    pending = sorted(group.pending, key=lambda e: -lengths[e.id])  # similar lengths share a batch: less padding
    scores = [s["score"] for s in done.values() if sample_key(s)[:3] == (task.name, name, sparsity)]
    samples_file, batches_file = own_file(out, "samples", shard), own_file(out, "batches", shard)

    def save_batch(indices: list[int], samples: list[dict], timing: dict) -> None:
        """Grade a finished batch, append its samples and timing, advance the progress bar."""
        batch = [pending[i] for i in indices]
        grades = task.grade_many(batch, [s["completion"] for s in samples])
        for example, sample, score in zip(batch, samples, grades):
            sample.update(task=task.name, method=name, sparsity=sparsity, id=example.id, score=float(score))
            if hasattr(method, "policy"):
                sample["budget"] = method.policy.budget
            if matched_to:
                sample["matched_to"] = matched_to
        _append(samples_file, samples)
        _append(batches_file, [{"task": task.name, "method": name, "sparsity": sparsity, **timing}])
        scores.extend(grades)
        bar.update(len(batch))
        bar.set_postfix_str(f"{task.name}/{name}@{sparsity:g} acc {sum(scores) / len(scores):.3f}")

    seeds = [stable_seed(config.seed, task.name, e.id) for e in pending]
    max_new = config.max_new_tokens or task.default_max_new_tokens
    generate_samples(model, tokenizer, method, [prompts[e.id] for e in pending], seeds, max_new, config, save_batch)


def _environment(model) -> dict:
    device = model.device
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rlkv": __version__,
        "python": platform.python_version(),
    }


def _open_run(out: Path, record: dict, invocation: dict, shard: Shard | None) -> dict[tuple, dict]:
    """Create or resume a run directory; return finished samples by (task, method, sparsity, id).

    config.json holds the run's identity once and every invocation (command, tasks, device) that
    added to it, so results gathered by several commands stay traceable. The head files are part of
    the identity per method: an invocation may add a head-ranked method, with its own file, to a
    run that has not had it, but not change the file of one it has. Shards start together,
    so its read-check-rewrite holds an exclusive lock on OUT/.lock: no invocation is lost.
    """
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    with (out / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        old = read_config(out)
        if old is not None:
            defaults = {**{f.name: f.default for f in fields(EvalConfig)}, **BEFORE_IT_EXISTED}  # of older runs
            before = {k: old.get(k, defaults.get(k)) for k in IDENTITY}
            heads, heads_diff = _heads_identity(old.get("heads_sha256"), record.get("heads_sha256") or {})
            changes = [f"{k}: {before[k]!r} -> {record.get(k)!r}" for k in IDENTITY if before[k] != record.get(k)]
            changes += [f"heads_sha256[{m}]: {was!r} -> {now!r}" for m, was, now in heads_diff]
            if changes:
                raise ValueError(
                    f"{out} holds a run with a different configuration ({', '.join(changes)}); use a new --out"
                )
            record = {**record, "heads_sha256": heads, "invocations": old.get("invocations", []) + [invocation]}
        else:
            record = {**record, "invocations": [invocation]}
        write_whole(config_path, json.dumps(record, indent=1))
    for kind in ("samples", "batches"):
        own = own_file(out, kind, shard)
        if own.with_name(own.name + ".gz").is_file():
            raise ValueError(f"{out} is archived ({own.name}.gz): gunzip its .jsonl.gz files to add to the run")
        drop_torn_tail(own)  # only its own: another shard may be mid-write in its files
    return {sample_key(s): s for s in run_records(out, "samples")}


def _heads_identity(old: dict | str | None, new: dict[str, str]) -> tuple[dict | str, list[tuple]]:
    """The run's head-file hashes after an invocation using `new` ({method: sha256}), and its conflicts.

    A conflict is (method, recorded hash, new hash). Runs recorded before the hashes were kept per
    method hold one hash for every head-ranked method they ran (or None when they ran none).
    """
    if isinstance(old, str):
        return old, [(m, old, sha) for m, sha in new.items() if sha != old]
    old = old or {}
    return {**old, **new}, [(m, old[m], sha) for m, sha in new.items() if m in old and old[m] != sha]


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
