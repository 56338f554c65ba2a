"""MBPP (Mostly Basic Python Problems), test split: write one function, graded by its asserts.

Records: ``prompt``, ``test`` (assert lines), ``code`` (reference solution), ``task_id``, and,
optionally, MBPP's ``test_setup_code``. The prompt names the function the tests call (found by
parsing the asserts) and shows the asserts; grading runs the completion's last ```python block
in :mod:`rlkv.tasks.sandbox`, which returns the values of the asserts' calls to the grader, and
scores 1.0 only if every assert holds on them.

Task 367 tests trees ``root``, ``root1``, ``root2`` that MBPP builds in its
``test_setup_code``; copies without that field (like ``mbpp_test.jsonl``) get it from
``SETUP_CODE`` here, so that its reference solution, like all others, passes.
"""

from __future__ import annotations

import ast
import builtins
import warnings

from rlkv.tasks.base import Example, Task
from rlkv.tasks.sandbox import Job, Limits, extract_code, run_code, run_many

SETUP_CODE = {
    367: (
        "root = Node(1)\nroot.left = Node(2)\nroot.right = Node(3)\nroot.left.left = Node(4)\n"
        "root.left.right = Node(5)\nroot.left.left.left = Node(8)\n"
        "root1 = Node(1)\nroot1.left = Node(2)\nroot1.right = Node(3)\nroot1.left.left = Node(4)\n"
        "root1.left.right = Node(5)\nroot1.right.left = Node(6)\nroot1.left.left.left = Node(7)\n"
        "root2 = Node(1)\nroot2.left = Node(2)\nroot2.right = Node(3)\nroot2.left.left = Node(4)\n"
        "root2.left.left.left = Node(7)"
    ),
}


def entry_point(tests: list[str], code: str) -> str:
    """The function the asserts test: the first one they call that ``code`` defines, else the
    first called name that is not a builtin (task 11 tests a ``sum`` that shadows the builtin)."""
    called = [
        node.func.id
        for test in tests
        for node in ast.walk(ast.parse(test.strip()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    with warnings.catch_warnings():  # reference code has invalid escapes like "\w" in plain strings
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        tree = ast.parse(code)
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    candidates = [name for name in called if name in defined]
    candidates += [name for name in called if not hasattr(builtins, name)]
    if candidates:
        return candidates[0]
    raise ValueError(f"no function to name found in MBPP tests {tests!r}")


class MBPP(Task):
    name = "mbpp"
    files = ("mbpp_test.jsonl",)
    fields = ("prompt", "test", "code", "task_id")
    limits = Limits()
    """Sandbox limits for running a completion (set on an instance to change them)."""

    def make_example(self, record: dict, index: int, source: str) -> Example:
        tests = [line.strip() for line in record["test"]]
        setup = record.get("test_setup_code") or SETUP_CODE.get(record["task_id"], "")
        return Example(
            id=f"mbpp-{record['task_id']}",
            question=record["prompt"],
            answer=record["code"],
            meta={
                "tests": tests,
                "setup": setup,
                "entry_point": entry_point(tests, record["code"]),
                "task_id": record["task_id"],
            },
        )

    def user_message(self, example: Example) -> str:
        setup = example.meta["setup"]
        shown = f"The tests first run:\n```python\n{setup}\n```\n" if setup else ""
        return (
            f"{example.question}\n"
            f"Write a Python function named `{example.meta['entry_point']}`. {shown}"
            "Your code should pass these tests:\n"
            "```python\n" + "\n".join(example.meta["tests"]) + "\n```\n"
            "Put your final solution in a single ```python code block."
        )

    def sandbox_tests(self, example: Example) -> list[str]:
        """What the sandbox runs after the solution: the setup code, then each assert."""
        setup = example.meta["setup"]
        return ([setup] if setup else []) + example.meta["tests"]

    def grade(self, example: Example, completion: str) -> float:
        tests, tested = self.sandbox_tests(example), {example.meta["entry_point"]}
        return float(run_code(extract_code(completion), tests, self.limits, tested=tested).passed)

    def grade_many(self, examples: list[Example], completions: list[str]) -> list[float]:
        """Scores of many completions, run in parallel sandboxes (see :func:`run_many`)."""
        if len(examples) != len(completions):
            raise ValueError(f"got {len(examples)} examples but {len(completions)} completions")
        jobs = [
            Job(extract_code(c), self.sandbox_tests(e), tested={e.meta["entry_point"]})
            for e, c in zip(examples, completions)
        ]
        return [float(result.passed) for result in run_many(jobs, limits=self.limits)]
