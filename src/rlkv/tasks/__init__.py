"""Reasoning tasks by name: data loading, chat prompts and answer grading behind one contract.

    from rlkv import tasks
    task = tasks.get("gsm8k")
    examples = task.load(limit=100)                 # data_dir=None: $RLKV_DATA_DIR or ../shared/data
    prompt = task.prompt(examples[0], tokenizer)    # the model's chat template, R1 instruction
    score = task.grade(examples[0], completion)     # 1.0 / 0.0 on the final answer
    pool = tasks.get("math_train+gsm8k_train")      # several tasks as one (rlkv.tasks.mix)

Each task is one module holding one :class:`~rlkv.tasks.base.Task` subclass; this registry
maps names to instances. :func:`register` adds a task (e.g. a custom one) under its ``name``.
"""

from __future__ import annotations

from rlkv.tasks.aime24 import AIME24
from rlkv.tasks.arith import Arith
from rlkv.tasks.base import Example, MathTask, Task
from rlkv.tasks.gsm8k import GSM8K, GSM8KTrain
from rlkv.tasks.math500 import MATH500
from rlkv.tasks.math_train import MathTrain
from rlkv.tasks.mbpp import MBPP
from rlkv.tasks.mix import TaskMix

__all__ = ["Example", "MathTask", "Task", "TaskMix", "get", "names", "register"]

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` available as ``get(task.name)``; a name can be registered only once."""
    if not task.name:
        raise ValueError(f"{task!r} has no name; set the class attribute `name`")
    if task.name in _REGISTRY:
        raise ValueError(f"a task named {task.name!r} is already registered ({_REGISTRY[task.name]!r})")
    _REGISTRY[task.name] = task
    return task


def names() -> list[str]:
    """Names of the registered tasks, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Task:
    """The task registered as ``name``, or a mix of registered tasks named ``"a+b"`` (`TaskMix`)."""
    if "+" in name:
        return TaskMix([get(part) for part in name.split("+")])
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


for _task in (GSM8K(), MATH500(), AIME24(), MBPP(), MathTrain(), GSM8KTrain(), Arith()):
    register(_task)
del _task
