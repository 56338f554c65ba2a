"""MBPP: every reference solution passes its own asserts in the sandbox; wrong code scores 0."""

from rlkv import tasks
from rlkv.tasks.mbpp import MBPP, entry_point
from rlkv.tasks.sandbox import Limits


def test_all_500_reference_solutions_pass(data_dir):
    task = MBPP()
    task.limits = Limits(timeout=60)  # generous: a few references run for seconds on a busy CPU
    examples = task.load(data_dir)
    completions = [f"Here is my solution.\n```python\n{e.answer}\n```\nIt passes the tests." for e in examples]
    scores = task.grade_many(examples, completions)
    assert len(scores) == 500
    failing = [e.id for e, score in zip(examples, scores) if score != 1.0]
    assert not failing, f"reference solutions failing their own tests: {failing}"


def test_wrong_or_missing_code_scores_zero(data_dir):
    task = tasks.get("mbpp")
    example = task.load(data_dir, limit=1)[0]
    assert task.grade(example, "```python\ndef remove_Occ(s, ch):\n    return s\n```") == 0.0
    assert task.grade(example, "I cannot solve this.") == 0.0
    assert task.grade(example, example.answer) == 1.0  # unfenced code is run whole


def test_entry_point_prefers_the_function_the_reference_defines():
    assert entry_point(["assert set(similar(1, 2)) == {1}"], "def similar(a, b): pass") == "similar"
    assert entry_point(["assert sum(10, 15) == 6"], "def sum(a, b): pass") == "sum"
    assert entry_point(["assert math.isclose(area(2), 12.56)"], "") == "area"
