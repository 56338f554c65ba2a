"""AIME 2024 (I and II, 30 problems): integer answers 0-999, long generations.

Records: ``id``, ``problem``, ``solution``, ``answer``, ``url``.
"""

from __future__ import annotations

from rlkv.tasks.base import Example, MathTask


class AIME24(MathTask):
    name = "aime24"
    files = ("aime24_test.jsonl",)
    fields = ("id", "problem", "answer")
    default_max_new_tokens = 16384

    def make_example(self, record: dict, index: int, source: str) -> Example:
        return Example(
            id=f"aime24-{record['id']}",
            question=record["problem"],
            answer=str(record["answer"]).strip(),
            meta={key: record[key] for key in ("solution", "url") if key in record},
        )
