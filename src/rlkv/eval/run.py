"""The evaluation harness: (task x method x sparsity) -> graded samples on disk -> aggregates.

A run lives in one directory (`rlkv.eval.rundir`: config.json, samples, batches, summary.json).
An interrupted run resumes: finished samples are read back and skipped. A directory holding a
run of another configuration is refused rather than mixed. config.json is rewritten under a lock,
summary.json replaced whole, so shards that start and finish together leave every file intact.

Everything that can be wrong with the inputs (task names, data files, head files, chat
template) is checked before the directory is touched, so a bad call leaves nothing half-written.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from rlkv import methods as method_registry
from rlkv import tasks as task_registry
from rlkv.engine import check_setting, degenerate, engine_for
from rlkv.engine.sampling import stable_seed
from rlkv.eval.rundir import Shard, drop_torn_tail, own_file, read_config, run_records, sample_key, sole_writer, write_whole
from rlkv.eval.summary import summarize
from rlkv.heads import KEEP_RULES
from rlkv.methods.matching import TOLERANCE, bytes_over_decoding, match_budget
from rlkv.models import Layout, eos_ids, generated_end

IDENTITY = ("model", "max_new_tokens", "temperature", "top_p", "seed", "sink", "recent", "budget",
            "match_bytes", "keep_rule")


@dataclass
class EvalConfig:
    """What to evaluate; defaults follow the paper (sink 16 + recent 64, greedy)."""

    tasks: list[str]
    methods: list[str] = field(default_factory=lambda: ["full"])
    sparsities: list[float] = field(default_factory=lambda: [0.0])
    heads: str | dict[str, str] | None = None  # one head-score file, or one per method: {"rlkv": a, "duo": b}
    limit: int | None = None
    max_new_tokens: int | None = None  # None: each task's own default
    batch_size: int | None = None  # prompts per transformers generate call, finished samples recorded at once (None: 32)
    max_running: int | None = None  # most sequences the engine runs at once (None: as many as kv_budget holds, up to 256)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sink: int = 16
    recent: int = 64
    budget: int | None = None  # tokens per KV head for h2o / snapkv / rkv
    keep_rule: str = "rank"  # how rlkv / duo / random scores become heads: "rank" or "authors" (rlkv.heads)
    match_bytes: bool = False  # instead: per task and sparsity, the budget matching a head-split method's mean bytes
    data_dir: str | None = None
    repetition_window: int = 400  # 0 turns the degenerate-repetition stop off
    repetition_min_distinct: int = 40
    engine: str = "auto"  # generate through rlkv.Engine: "auto" (on CUDA), "on" or "off" (transformers generate)
    kv_budget: str | float | None = None  # the engine's KV pool: a size ("20GiB") or a share of free GPU memory

    def __post_init__(self):
        check_setting(self.engine)
        _check_settings(self)
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule must be one of {', '.join(KEEP_RULES)}, got {self.keep_rule!r}")
        if isinstance(self.heads, dict) and set(self.heads) - set(self.methods):
            raise ValueError(f"heads are given for {sorted(set(self.heads) - set(self.methods))}, "
                             f"which are not among the evaluated methods {self.methods}")


# The least value of each whole-number setting; those that may be None (the default) are in OPTIONAL.
MINIMUM = {"batch_size": 1, "max_running": 1, "limit": 1, "max_new_tokens": 1, "sink": 0, "recent": 1, "budget": 1,
           "repetition_window": 0, "repetition_min_distinct": 1}
OPTIONAL = ("batch_size", "max_running", "limit", "max_new_tokens", "budget")
BATCH_SIZE = 32  # batch_size when None


def _check_settings(config: EvalConfig) -> None:
    """One line for the first setting that is not what it should be (a bad value never reaches a run)."""
    for name in ("tasks", "methods", "sparsities"):
        values = getattr(config, name)
        if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"EvalConfig {name} must be a non-empty list, got {values!r}")
    for sparsity in config.sparsities:
        if not _is_number(sparsity) or not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be a number in [0, 1] (fraction of KV heads compressed; full and "
                             f"streaming take one too), got {sparsity!r}")
    for name, least in MINIMUM.items():
        value = getattr(config, name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"EvalConfig {name} must be an integer >= {least}, got {value!r}")
    if not _is_number(config.temperature) or not config.temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {config.temperature!r}")
    if not _is_number(config.top_p) or not 0 <= config.top_p <= 1:
        raise ValueError(f"top_p must be a number in [0, 1], got {config.top_p!r}")


def _is_number(value) -> bool:
    """A real, finite number (not a bool, not nan or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class EvalResults:
    out: Path
    rows: list[dict]
    samples: list[dict]

    def table(self) -> str:
        from rlkv.eval.report import markdown_table

        return markdown_table(self.rows)


class RepetitionStop(StoppingCriteria):
    """`rlkv.engine.engine.degenerate` for transformers `generate`: rows it flags stop, and `flagged` maps
    each to the tokens it had generated then (the first time: a finished row's padding can look degenerate too)."""

    def __init__(self, prompt_len: int, window: int, min_distinct: int):
        self.prompt_len, self.window, self.min_distinct = prompt_len, window, min_distinct
        self.flagged: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        if not self.window or generated == 0 or generated % self.window:  # between checks: no copy to the host
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = [degenerate(tokens, self.window, self.min_distinct) for tokens in input_ids[:, self.prompt_len :].tolist()]
        for row in (row for row, stop in enumerate(done) if stop):
            self.flagged.setdefault(row, generated)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _method_plan(config: EvalConfig, layout: Layout) -> list[tuple[str, float, object]]:
    """(method name, sparsity, built method) for every group, built now so bad inputs fail early.

    With `match_bytes`, token-dropping methods come last and unbuilt (None): their budget is
    matched to the head-split samples of the same task and sparsity once those exist.
    """
    if config.match_bytes and bytes_reference(config.methods) is None:
        raise ValueError(f"--match-bytes needs a head-split method to match ({', '.join(method_registry.HEAD_RANKED)})")
    plan, seen = [], set()
    for name in config.methods:
        for sparsity in config.sparsities:
            if config.match_bytes and name in method_registry.TOKEN_DROPPING:
                plan.append((name, float(sparsity), None))
                continue
            rule = {"keep_rule": config.keep_rule} if name in method_registry.HEAD_RANKED else {}
            method = method_registry.build(
                name, layout, sparsity, heads=_heads_for(config, name), sink=config.sink, recent=config.recent,
                seed=config.seed,
                budget=config.budget, **rule,
            )
            key = (name, method.sparsity)
            if key not in seen:
                seen.add(key)
                plan.append((name, method.sparsity, method))
    return sorted(plan, key=lambda p: p[2] is None)


def _heads_for(config: EvalConfig, method: str) -> str | None:
    """The head-score file of `method`: the one file, or its entry in a per-method mapping."""
    if isinstance(config.heads, dict):
        return config.heads.get(method)
    return config.heads


def _matched(name: str, task: str, sparsity: float, ids: set[str], config: EvalConfig, layout: Layout, out: Path):
    """The token-dropping method `name` with the budget that matches the head-split run's mean bytes.

    The reference is the first head-split method of the run on the same task and sparsity, and it
    must be complete (every example id in `ids`): a budget matched to part of it would differ from
    the one a resume matches to all of it. Unsharded, it is, as the reference group runs first; a
    shard may find it still running in the shard that owns it.
    """
    ref = bytes_reference(config.methods)  # _method_plan checked there is one
    reference = [s for s in run_records(out, "samples")
                 if (s["task"], s["method"], float(s["sparsity"])) == (task, ref, sparsity)]
    have = len(ids & {str(s["id"]) for s in reference})
    if have < len(ids):
        raise ValueError(
            f"--match-bytes: {name} on {task} at sparsity {sparsity:g} takes its budget from the KV bytes of {ref} "
            f"there, which has {have} of {len(ids)} samples in {out}; that group must finish first (run the "
            f"head-split methods without --shard first, or run this shard again once the one that owns it is done)"
        )

    def build(budget: int):
        return method_registry.build(name, layout, sparsity, budget=budget)

    match = match_budget(build, layout, reference)
    if match.excess > TOLERANCE:
        warnings.warn(
            f"--match-bytes: {name} cannot hold as little KV as {ref} on {task} at sparsity {sparsity:g}: its budget "
            f"of {match.budget} tokens is predicted to hold {100 * match.excess:.0f}% more; it runs there and the "
            "report marks it as not at equal memory", stacklevel=2)
    return build(match.budget)


def bytes_reference(methods: list[str]) -> str | None:
    """The head-split method whose KV bytes `--match-bytes` matches: the first head-ranked one listed."""
    return next((m for m in methods if m in method_registry.HEAD_RANKED), None)


def _environment(model) -> dict:
    import transformers

    import rlkv

    device = model.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rlkv": rlkv.__version__,
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
            defaults = {f.name: f.default for f in fields(EvalConfig)}  # a run made before a setting existed had its default
            before = {k: old.get(k, defaults.get(k)) for k in IDENTITY}
            heads, heads_diff = _heads_identity(old.get("heads_sha256"), record.get("heads_sha256") or {})
            changes = [f"{k}: {before[k]!r} -> {record.get(k)!r}" for k in IDENTITY if before[k] != record.get(k)]
            changes += [f"heads_sha256[{m}]: {was!r} -> {now!r}" for m, was, now in heads_diff]
            if changes:
                raise ValueError(f"{out} holds a run with a different configuration ({', '.join(changes)}); use a new --out")
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


def evaluate(
    model, tokenizer, config: EvalConfig, out: str | Path, progress: bool = True, examples: dict | None = None,
    shard: Shard | None = None,
) -> EvalResults:
    """Generate, grade and record every (task, method, sparsity) group of `config` under `out`.

    `examples` ({task name: [Example]}) replaces loading a task's data (e.g. a held-out slice).
    `shard` runs only that shard's groups; the results returned are all the run's at the end.
    """
    out = Path(out)
    layout = Layout.of(model)
    tasks = {name: task_registry.get(name) for name in config.tasks}
    given = examples or {}
    examples = {
        name: given[name][: config.limit] if name in given else task.load(config.data_dir, limit=config.limit)
        for name, task in tasks.items()
    }
    for name, task in tasks.items():
        if not examples[name]:
            raise ValueError(f"task {name!r} has no examples (limit={config.limit})")
        task.prompt(examples[name][0], tokenizer)  # refuses a tokenizer without a chat template
    plan = _method_plan(config, layout)
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
        "method_params": [m.describe() if m else {"method": n, "sparsity": sp, "budget": "matched"} for n, sp, m in plan],
        "environment": _environment(model),
        "shard": str(shard) if shard else None,
    }
    with sole_writer(out, shard):  # before _open_run, which truncates this process's files' torn tails
        done = _open_run(out, record, invocation, shard)
        eos = eos_ids(model, tokenizer)
        samples_file, batches_file = own_file(out, "samples", shard), own_file(out, "batches", shard)

        groups = [(task_name, name, sparsity, method) for task_name in tasks for name, sparsity, method in plan]
        todo = [
            (task_name, name, sparsity, method, [e for e in examples[task_name] if (task_name, name, sparsity, e.id) not in done])
            for g, (task_name, name, sparsity, method) in enumerate(groups)
            if shard is None or shard.owns(g)
        ]
        # Budgets to match last (the order of the work, not of the numbering): by then this process's
        # head-split groups are done, and the other shards have had the most time to finish theirs.
        todo.sort(key=lambda group: group[3] is None)
        total = sum(len(pending) for *_, pending in todo)
        bar = tqdm(total=total, desc="eval", disable=not progress, dynamic_ncols=True)
        for task_name, name, sparsity, method, pending in todo:
            if not pending:
                continue
            matched_to = None
            if method is None:
                matched_to = bytes_reference(config.methods)
                method = _matched(name, task_name, sparsity, {str(e.id) for e in examples[task_name]}, config, layout, out)
            task = tasks[task_name]
            max_new = config.max_new_tokens or task.default_max_new_tokens
            prompts = {e.id: task.prompt(e, tokenizer) for e in pending}
            lengths = {i: len(tokenizer(p, add_special_tokens=False).input_ids) for i, p in prompts.items()}
            pending = sorted(pending, key=lambda e: -lengths[e.id])  # similar lengths share a batch: less padding
            scores = [s["score"] for s in done.values() if sample_key(s)[:3] == (task_name, name, sparsity)]
            cap = {"max_batch": config.max_running} if config.max_running else {}  # else the engine's own
            engine = engine_for(config.engine, model, tokenizer, method, kv_budget=config.kv_budget, **cap)

            def save_batch(batch: list, samples: list[dict], timing: dict) -> None:
                """Grade a finished batch, append its samples and timing, advance the progress bar."""
                grades = task.grade_many(batch, [s["completion"] for s in samples])
                for example, sample, score in zip(batch, samples, grades):
                    sample.update(task=task_name, method=name, sparsity=sparsity, id=example.id, score=float(score))
                    if hasattr(method, "policy"):
                        sample["budget"] = method.policy.budget
                    if matched_to:
                        sample["matched_to"] = matched_to
                _append(samples_file, samples)
                _append(batches_file, [{"task": task_name, "method": name, "sparsity": sparsity, **timing}])
                scores.extend(grades)
                bar.update(len(batch))
                bar.set_postfix_str(f"{task_name}/{name}@{sparsity:g} acc {sum(scores) / len(scores):.3f}")

            if engine:
                _generate_engine(engine, task_name, pending, prompts, max_new, eos, config, save_batch)
            else:
                rows = config.batch_size or BATCH_SIZE
                for start in range(0, len(pending), rows):
                    batch = pending[start : start + rows]
                    save_batch(batch, *_generate_batch(
                        model, tokenizer, method, [prompts[e.id] for e in batch], max_new, eos, config, layout
                    ))
            del engine  # its KV pool goes back before the next group's
        bar.close()
        samples, rows = summarize_run(out)  # every process's, as they are now
        write_summary(out, record, rows)
        return EvalResults(out, rows, samples)


def summarize_run(out: Path) -> tuple[list[dict], list[dict]]:
    """Every sample of a run as it is now (all shards') and their aggregate rows. A matched group is
    compared with the head-split method its samples name; samples from before they named it, with the
    first head-ranked method of the run's last invocation."""
    samples = run_records(out, "samples")
    reference, config = None, read_config(out) or {}
    if config.get("match_bytes") and config.get("invocations"):
        reference = bytes_reference(config["invocations"][-1]["methods"])
    return samples, summarize(samples, run_records(out, "batches"), reference)


def write_summary(out: Path, record: dict, rows: list[dict]) -> None:
    """summary.json: the run's identity (config.json without its invocations) and aggregate rows."""
    write_whole(out / "summary.json", json.dumps({"config": record, "rows": rows}, indent=1))


def _record_kv_bytes(samples: list[dict], cache, full_per_token: int) -> None:
    """KV bytes each sequence held at its end and on average over its decoding steps, and a full cache's.

    The average is exact for any growth law: the cache's own `sequence_nbytes` is evaluated at
    every length the sequence went through (prompt + 1 ... prompt + tokens).
    """
    for s, (t, b) in zip(samples, bytes_over_decoding(cache.sequence_nbytes, samples)):
        s.update(kv_bytes=int(b[-1]), kv_bytes_full=int(t[-1]) * full_per_token,
                 kv_bytes_mean=float(b.mean()), kv_bytes_full_mean=float(t.double().mean()) * full_per_token)


def _generate_engine(engine, task_name: str, pending: list, prompts: dict, max_new: int, eos: list[int],
                     config: EvalConfig, save_batch) -> None:
    """Every pending prompt in one engine call (continuous batching throughout); each `batch_size`
    finished samples are recorded at once, so an interrupted run keeps them.

    A batch's seconds are the generation wall time since the previous batch, grading excluded.
    Seeds come from (run seed, task, example id): a resumed run samples each example as before.
    """
    buffer: list[tuple[int, object]] = []
    clock = {"last": time.perf_counter(), "grading": 0.0}

    def flush() -> None:
        if not buffer:
            return
        now = time.perf_counter()
        batch = [pending[i] for i, _ in buffer]
        samples = [{"completion": o.text, "tokens": len(o.tokens), "prompt_tokens": o.prompt_tokens,
                    "finish": o.finish} for _, o in buffer]
        _record_kv_bytes(samples, engine.store, engine.layout.kv_bytes_per_token())
        timing = {"seconds": now - clock["last"] - clock["grading"], "tokens": sum(s["tokens"] for s in samples),
                  "batch": len(samples), "engine": True}
        buffer.clear()
        save_batch(batch, samples, timing)
        clock["last"] = now
        clock["grading"] = time.perf_counter() - now  # grading and writing stall generation: not its time

    def on_complete(index: int, completion) -> None:
        buffer.append((index, completion))
        if len(buffer) >= (config.batch_size or BATCH_SIZE):
            flush()

    engine.generate(
        [prompts[e.id] for e in pending], max_new_tokens=max_new, temperature=config.temperature, top_p=config.top_p,
        seed=[stable_seed(config.seed, task_name, e.id) for e in pending], eos_token_ids=eos,
        repetition_window=config.repetition_window, repetition_min_distinct=config.repetition_min_distinct,
        on_complete=on_complete,
    )
    flush()


def _generate_batch(model, tokenizer, method, prompts, max_new, eos, config: EvalConfig, layout: Layout):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    width = enc.input_ids.shape[1]
    stops = StoppingCriteriaList()
    repetition = None
    if config.repetition_window:
        repetition = RepetitionStop(width, config.repetition_window, config.repetition_min_distinct)
        stops.append(repetition)
    sampling = {"do_sample": False} if config.temperature == 0 else {
        "do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
    torch.manual_seed(config.seed)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with method.apply(model) as handle:
        sequences = model.generate(
            **enc, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stops, **sampling,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cache = handle.cache
    generated = sequences[:, width:].cpu()
    prompt_tokens = enc.attention_mask.sum(-1).cpu()
    samples = []
    for row in range(len(prompts)):
        n, finish = generated_end(generated[row], torch.tensor(eos), repetition.flagged.get(row) if repetition else None)
        samples.append({
            "completion": tokenizer.decode(generated[row, :n], skip_special_tokens=True),
            "tokens": n,
            "prompt_tokens": int(prompt_tokens[row]),
            "finish": finish,
        })
    _record_kv_bytes(samples, cache, layout.kv_bytes_per_token())
    timing = {"seconds": seconds, "tokens": sum(s["tokens"] for s in samples), "batch": len(prompts)}
    return samples, timing

