"""GSM8K (grade-school math word problems) graded on the final number: the test split, and the
train split as a training task for RL identification (`gsm8k_train`: a pool where small models
earn rewards, unlike competition math).

Records: ``question`` and ``answer``, the reference solution whose last line is ``#### N``;
the reference final answer is N without thousands commas, and the full solution is kept in
``meta["solution"]``.
"""

from __future__ import annotations

from rlkv.excerpt import excerpt
from rlkv.tasks.base import Example, MathTask


def final_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K reference solution, commas stripped."""
    if "####" not in solution:
        last = solution.strip().splitlines()[-1] if solution.strip() else ""
        raise ValueError(f"GSM8K solution has no '#### <answer>' line; its last line: {excerpt(last, 80)!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


class GSM8K(MathTask):
    name = "gsm8k"
    files = ("gsm8k_test.jsonl",)
    fields = ("question", "answer")

    def make_example(self, record: dict, index: int, source: str) -> Example:
        return Example(
            id=f"{self.name}-{index}",
            question=record["question"],
            answer=final_answer(record["answer"]),
            meta={"solution": record["answer"]},
        )


class GSM8KTrain(GSM8K):
    name = "gsm8k_train"
    files = ("gsm8k_train.jsonl",)
    split = "train"
