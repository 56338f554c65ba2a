"""GSM8K (grade-school math word problems), test split, graded on the final number.

Records: ``question`` and ``answer``, the reference solution whose last line is ``#### N``;
the reference final answer is N without thousands commas, and the full solution is kept in
``meta["solution"]``.
"""

from __future__ import annotations

from rlkv.tasks.base import Example, Task
from rlkv.tasks.grading import grade_math


def final_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K reference solution, commas stripped."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '#### <answer>' line: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


class GSM8K(Task):
    name = "gsm8k"
    files = ("gsm8k_test.jsonl",)
    fields = ("question", "answer")

    def make_example(self, record: dict, index: int, source: str) -> Example:
        return Example(
            id=f"gsm8k-{index}",
            question=record["question"],
            answer=final_answer(record["answer"]),
            meta={"solution": record["answer"]},
        )

    def grade(self, example: Example, completion: str) -> float:
        return grade_math(completion, example.answer)
