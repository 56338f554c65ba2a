"""The procedural arithmetic task: deterministic per seed, adjustable, and answers that check out."""

import re

import pytest

from rlkv import tasks
from rlkv.tasks.arith import generate

EVENTS = [  # (pattern, effect on counts given the match, the counts now and at the start)
    (r"(\w+) gives (\d+) \w+ to (\w+)\.", lambda m, c, s: {m[1]: -int(m[2]), m[3]: int(m[2])}),
    (r"(\w+) loses (\d+) \w+\.", lambda m, c, s: {m[1]: -int(m[2])}),
    (r"(\w+) finds (\d+) more \w+\.", lambda m, c, s: {m[1]: int(m[2])}),
    (r"(\w+)'s number of \w+ doubles\.", lambda m, c, s: {m[1]: c[m[1]]}),
    (r"(\w+) receives as many \w+ as (\w+) has now\.", lambda m, c, s: {m[1]: c[m[2]]}),
    (r"(\w+) receives as many \w+ as (\w+) had at the start\.", lambda m, c, s: {m[1]: s[m[2]]}),
]


def solve(question: str) -> int:
    """An independent solver reading only the question text."""
    start = {name: int(n) for name, n in re.findall(r"(\w+) has (\d+) \w+", question.split("\n")[0])}
    counts = dict(start)
    for line in re.findall(r"^\d+\. (.*)$", question, flags=re.MULTILINE):
        pattern, effect = next((p, e) for p, e in EVENTS if re.fullmatch(p, line))
        for who, change in effect(re.fullmatch(pattern, line), counts, start).items():
            counts[who] += change
            assert counts[who] >= 0
    return counts[re.search(r"How many \w+ does (\w+) have at the end\?", question)[1]]


def test_same_seed_same_problems_other_seed_other_problems():
    task = tasks.get("arith")
    assert task.load(seed=3, limit=20, difficulty=2) == task.load(seed=3, limit=20, difficulty=2)
    assert task.load(seed=3, limit=5, difficulty=2) == task.load(seed=3, limit=20, difficulty=2)[:5]
    other = task.load(seed=4, limit=20, difficulty=2)
    assert all(a.question != b.question for a, b in zip(task.load(seed=3, limit=20, difficulty=2), other))
    assert len(task.load()) == 500


@pytest.mark.parametrize("difficulty", [1, 3, 8])
def test_answers_check_out_and_worked_solutions_grade_one(difficulty):
    task = tasks.get("arith")
    for example in task.load(seed=11, limit=60, difficulty=difficulty):
        assert solve(example.question) == int(example.answer), example.question
        assert task.grade(example, example.meta["solution"]) == 1.0
        assert task.grade(example, rf"\boxed{{{int(example.answer) + 1}}}") == 0.0


def test_difficulty_sets_people_and_events():
    easy, hard = generate(0, 1, 0), generate(0, 6, 0)
    assert (len(easy.meta["start"]), len(easy.meta["events"])) == (3, 3)
    assert (len(hard.meta["start"]), len(hard.meta["events"])) == (8, 18)
    assert "had at the start" in " ".join(e.question for e in tasks.get("arith").load(limit=20))
    with pytest.raises(ValueError, match="difficulty must be an integer >= 1"):
        tasks.get("arith").load(difficulty=0)
