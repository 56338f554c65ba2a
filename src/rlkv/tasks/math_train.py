"""Math training problems for RL: the MATH train split plus AIME 1983-2023.

Records (``math_train.json``, ``aime_1983_2023_train.json``, JSON lists): ``problem`` and
``answer``; other fields (difficulty, type, year, ...) go to ``meta``. The few problems
without an answer (empty or null: 4 in ``math_train.json``) are skipped, since they cannot be
rewarded; filtering to problems the policy can solve is left to sampling, later. Ids are
``<file stem>-<index in file>``.
"""

from __future__ import annotations

from rlkv.tasks.base import Example, MathTask


class MathTrain(MathTask):
    name = "math_train"
    files = ("math_train.json", "aime_1983_2023_train.json")
    fields = ("problem", "answer")
    split = "train"

    def make_example(self, record: dict, index: int, source: str) -> Example | None:
        answer = str(record["answer"] or "").strip()
        if not answer:
            return None
        return Example(
            id=f"{source.split('.')[0]}-{index}",
            question=record["problem"],
            answer=answer,
            meta={key: value for key, value in record.items() if key not in self.fields},
        )
