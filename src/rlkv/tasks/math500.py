"""MATH-500 (Lightman et al.'s 500-problem subset of MATH), graded with math-verify.

Records: ``problem``, ``solution``, ``answer``, ``subject``, ``level``, ``unique_id``; the id
is MATH's ``unique_id`` (e.g. ``test/algebra/1.json``).
"""

from __future__ import annotations

from rlkv.tasks.base import Example, MathTask


class MATH500(MathTask):
    name = "math500"
    files = ("math500_test.jsonl",)
    fields = ("problem", "solution", "answer", "unique_id")

    def make_example(self, record: dict, index: int, source: str) -> Example:
        return Example(
            id=record["unique_id"],
            question=record["problem"],
            answer=record["answer"],
            meta={key: record[key] for key in ("solution", "subject", "level") if key in record},
        )
