"""The task contract: what an evaluation or training task is, and how its data is read.

A :class:`Task` turns data into :class:`Example` records (``load``), an example into the
model's input (``prompt``: the user message wrapped in the model's own chat template) and a
completion into a score in [0, 1] (``grade``). A concrete task is a small subclass that names
its data files and required fields, builds one Example from one record and grades one
completion; everything shared (finding the data, reading JSON/JSONL with errors that point at
the file and line, shuffling, limiting, the chat template) lives here.

Data comes from a directory in the layout of ``../shared/data`` (see its SOURCES.md):
``data_dir=None`` means ``$RLKV_DATA_DIR``, else ``../shared/data`` from the current
directory. A string ``"hf:<dataset id>[:<config>]"`` instead reads the task's split from the
Hugging Face hub through the optional ``datasets`` package; its records must carry the same
fields as the files.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlkv.tasks.grading import ANSWER_RULES, grade_math

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The R1-style instruction appended to every math question."""

DATA_DIR_ENV = "RLKV_DATA_DIR"
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Example:
    """One problem: ``answer`` is the reference final answer (MBPP: the reference code)."""

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory to read: ``data_dir``, else ``$RLKV_DATA_DIR``, else ``../shared/data``."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    default = Path.cwd().parent / "shared" / "data"
    if default.is_dir():
        return default
    raise FileNotFoundError(
        f"no task data directory: pass data_dir=..., set ${DATA_DIR_ENV}, or run from a directory "
        f"next to shared/data (looked for {default})"
    )


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from a JSONL file (one object a line) or a JSON list file.

    ``where`` ("line 12", "record 3") locates the record for error messages.
    """
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object")
                yield f"line {number}", record
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of objects")
    for index, record in enumerate(records):
        yield f"record {index}", record


def read_hub(spec: str, split: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from hub dataset ``"hf:<id>[:<config>]"`` (needs ``datasets``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading {spec!r} needs the optional 'datasets' package: pip install datasets") from e
    dataset_id, _, config = spec.removeprefix(HUB_PREFIX).partition(":")
    try:
        rows = datasets.load_dataset(dataset_id, config or None, split=split)
    except Exception as e:
        raise RuntimeError(f"could not load split {split!r} of hub dataset {dataset_id!r}: {e}") from e
    for index, record in enumerate(rows):
        yield f"row {index}", dict(record)


class Task:
    """Base class of every task; subclasses set the class attributes and override the hooks."""

    name: str = ""
    files: tuple[str, ...] = ()
    """Data files read, in order, from the data directory."""
    fields: tuple[str, ...] = ()
    """Fields every record must have."""
    split: str = "test"
    """Split read when loading from the hub."""
    default_max_new_tokens: int = 8192

    def load(
        self, data_dir: str | os.PathLike | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        """The task's examples in file order, or shuffled by ``seed``; at most ``limit`` of them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        examples = [example for example in self._examples(data_dir) if example is not None]
        if seed is not None:
            random.Random(seed).shuffle(examples)
        return examples[:limit]

    def _examples(self, data_dir: str | os.PathLike | None) -> Iterator[Example | None]:
        """Every record made into an Example; a bad record raises naming its file and line."""
        if isinstance(data_dir, str) and data_dir.startswith(HUB_PREFIX):
            sources = [(data_dir, data_dir, read_hub(data_dir, self.split))]
        else:
            directory = resolve_data_dir(data_dir)
            paths = [directory / name for name in self.files]
            for path in paths:
                if not path.is_file():
                    raise FileNotFoundError(
                        f"task {self.name!r} needs data file {path.name!r}, not found in {directory}"
                    )
            sources = [(str(path), path.name, read_records(path)) for path in paths]
        for location, source, records in sources:
            for index, (where, record) in enumerate(records):
                missing = [name for name in self.fields if name not in record]
                if missing:
                    raise ValueError(
                        f"{location}: {where} is missing field {missing[0]!r} "
                        f"(a {self.name} record needs {', '.join(self.fields)})"
                    )
                try:
                    yield self.make_example(record, index, source)
                except (ValueError, TypeError, KeyError, SyntaxError) as e:
                    raise ValueError(f"{location}: {where} is not a valid {self.name} record: {e}") from e

    def make_example(self, record: dict, index: int, source: str) -> Example | None:
        """The Example for the ``index``-th record of ``source`` (a file name, or the hub spec),
        or None to skip a record that cannot be graded."""
        raise NotImplementedError

    def user_message(self, example: Example) -> str:
        """The user turn sent to the model; math tasks append the R1 instruction."""
        return f"{example.question}\n{MATH_INSTRUCTION}"

    def prompt(self, example: Example, tokenizer: Any) -> str:
        """The model input: the user message in the tokenizer's chat template, ready to generate."""
        if getattr(tokenizer, "chat_template", None) is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"tokenizer {name!r} has no chat template; task prompts require a chat model's "
                "tokenizer with a chat template (set tokenizer.chat_template)"
            )
        messages = [{"role": "user", "content": self.user_message(example)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def grade(self, example: Example, completion: str) -> float:
        """Score of ``completion`` for ``example``, in [0, 1]."""
        raise NotImplementedError

    def grade_many(self, examples: list[Example], completions: list[str]) -> list[float]:
        """Scores of ``completions[i]`` for ``examples[i]`` (tasks that can override this to grade
        concurrently)."""
        if len(examples) != len(completions):
            raise ValueError(f"got {len(examples)} examples but {len(completions)} completions")
        return [self.grade(example, completion) for example, completion in zip(examples, completions)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class MathTask(Task):
    """A task graded on its final answer against ``example.answer`` (``rlkv.tasks.grading.grade_math``),
    by the extraction rule ``answer_rule`` ("rlkv", or the RLKV authors' stricter "authors")."""

    answer_rule: str = "rlkv"

    def grade(self, example: Example, completion: str) -> float:
        return grade_math(completion, example.answer, self.answer_rule)

    def with_answer_rule(self, rule: str) -> MathTask:
        """This task graded by answer rule ``rule`` (a copy; the registered task is left as it is)."""
        if rule not in ANSWER_RULES:
            raise ValueError(f"unknown answer rule {rule!r}: expected one of {', '.join(ANSWER_RULES)}")
        task = copy.copy(self)
        task.answer_rule = rule
        return task
