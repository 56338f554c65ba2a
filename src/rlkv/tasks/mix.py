"""Several tasks as one pool of problems: `tasks.get("math_train+gsm8k_train")`.

RL identification draws its training problems from whatever the model can be rewarded on; a
mix lets one run take problems from several tasks (the curriculum then keeps those the model
solves reliably, whichever task they come from). Each example remembers its task in
``meta["task"]``, which prompts and grades it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

from rlkv.tasks.base import Example, MathTask, Task


class TaskMix(Task):
    """The examples of `parts` (tasks with distinct names) in order, each prompted and graded by its own task."""

    def __init__(self, parts: list[Task]):
        names = [part.name for part in parts]
        if len(parts) < 2 or len(set(names)) != len(names):
            raise ValueError(f"a task mix needs at least two distinct tasks, got {names}")
        self.parts = {part.name: part for part in parts}
        self.name = "+".join(names)
        self.split = "train" if all(part.split == "train" for part in parts) else "test"
        self.default_max_new_tokens = max(part.default_max_new_tokens for part in parts)

    def _examples(self, data_dir: str | os.PathLike | None) -> Iterator[Example]:
        for name, part in self.parts.items():
            for example in part.load(data_dir):
                yield replace(example, meta={**example.meta, "task": name})

    @property
    def answer_rule(self) -> str | None:
        """The answer rule every part grades by (None if they differ or are not graded on a final answer)."""
        rules = {getattr(part, "answer_rule", None) for part in self.parts.values()}
        return rules.pop() if len(rules) == 1 else None

    def part(self, example: Example) -> Task:
        """The task `example` came from."""
        name = example.meta.get("task")
        if name not in self.parts:
            raise ValueError(f"example {example.id!r} is not from one of {self.name}'s tasks (meta task {name!r})")
        return self.parts[name]

    def user_message(self, example: Example) -> str:
        return self.part(example).user_message(example)

    def grade(self, example: Example, completion: str) -> float:
        return self.part(example).grade(example, completion)

    def grade_many(self, examples: list[Example], completions: list[str]) -> list[float]:
        """Each task grades its own examples together (MBPP's sandbox runs them concurrently)."""
        if len(examples) != len(completions):
            raise ValueError(f"got {len(examples)} examples but {len(completions)} completions")
        scores: list[float] = [0.0] * len(examples)
        for part in self.parts.values():
            rows = [i for i, example in enumerate(examples) if self.part(example) is part]
            for i, score in zip(rows, part.grade_many([examples[i] for i in rows], [completions[i] for i in rows])):
                scores[i] = score
        return scores

    def with_answer_rule(self, rule: str) -> TaskMix:
        """The mix with every part graded by answer rule `rule` (each must be a MathTask)."""
        parts = [part for part in self.parts.values() if isinstance(part, MathTask)]
        if len(parts) < len(self.parts):
            others = [name for name, part in self.parts.items() if not isinstance(part, MathTask)]
            raise ValueError(f"answer rule {rule!r} applies to tasks graded on a final answer; {others} are not")
        return TaskMix([part.with_answer_rule(rule) for part in parts])
