"""Math grading: final-answer extraction, math-verify equivalences, and every reference solution."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlkv import tasks
from rlkv.tasks.grading import extract_answer, grade_math, last_boxed


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"so \boxed{\frac{1}{2}} is it", r"\frac{1}{2}"),
        (r"first \boxed{3}, then finally \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),
        (r"a tentative \boxed{7}, then the final one is cut off: \boxed{\frac{1", None),
        (r"only an echo of the instruction: \boxed{} and the number 5", None),
        (r"\boxed{12}. (Put your final answer within \boxed{}.)", "12"),
        ("She pays 3 + 4 = 7 dollars.\n#### 1,200", "1,200"),
        ("Adding them, the answer is $42$. Done.", "$42$"),
        ("The final answer is: 3.5.", "3.5"),
        ("We get 12 apples, then 15, then -2.5 left", "-2.5"),
        ("no digits here", None),
    ],
)
def test_extract_answer_takes_the_final_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_last_boxed_balances_braces():
    assert last_boxed(r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}") == r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"
    assert last_boxed("nothing boxed") is None


@pytest.mark.parametrize(
    ("reference", "completion"),
    [
        (r"\frac{1}{2}", r"\boxed{0.5}"),
        ("0.5", r"\boxed{\dfrac12}"),
        ("5", r"\boxed{5\text{ cm}}"),
        ("1000", r"\boxed{1,000}"),
        ("18", r"\boxed{\$18.00}"),
        ("25", r"\boxed{25\%}"),
        ("30", r"\boxed{30^\circ}"),
        (r"\text{(C)}", r"\boxed{C}"),
        (r"\sqrt{2}/2", r"\boxed{\frac{\sqrt{2}}{2}}"),
        ("72", "So she sold 72 clips.\n#### 72"),
        ("9", "Therefore, the answer is 9."),
    ],
)
def test_equivalent_forms_grade_one(reference, completion):
    assert grade_math(completion, reference) == 1.0


def test_only_the_final_answer_counts():
    completion = r"We find x = 42 early on. Re-checking gives a final answer of \boxed{41}."
    assert grade_math(completion, "42") == 0.0
    assert grade_math(r"Is it \boxed{42}? No: recomputing, \boxed{41}.", "42") == 0.0
    assert grade_math("I am not sure.", "42") == 0.0


def test_grading_works_off_the_main_thread():
    with ThreadPoolExecutor(2) as pool:
        scores = list(pool.map(lambda answer: grade_math(rf"\boxed{{{answer}}}", r"\frac{3}{4}"), ["0.75", "0.7"]))
    assert scores == [1.0, 0.0]


def test_every_gsm8k_reference_solution_grades_correctly(data_dir):
    task = tasks.get("gsm8k")
    examples = task.load(data_dir)
    assert len(examples) == 1319
    wrong = [e.id for e in examples if task.grade(e, e.meta["solution"]) != 1.0]
    assert not wrong, f"reference solutions graded below 1: {wrong[:10]}"
    confused = [e.id for e in examples if grade_math(e.meta["solution"], str(int(e.answer) + 1)) != 0.0]
    assert not confused, f"solutions graded 1 against answer + 1: {confused[:10]}"


def _different_answer(examples, index):
    """A really different answer: integer + 1, else the next problem's (textually different) answer."""
    answer = examples[index].answer
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    others = examples[index + 1 :] + examples[:index]
    return next(e.answer for e in others if e.answer.replace(" ", "") != answer.replace(" ", ""))


def test_every_math500_reference_solution_grades_correctly(data_dir):
    task = tasks.get("math500")
    examples = task.load(data_dir)
    assert len(examples) == 500
    wrong = [(e.id, e.answer) for e in examples if task.grade(e, e.meta["solution"]) != 1.0]
    assert not wrong, f"reference solutions graded below 1: {wrong}"
    confused = []
    for index, example in enumerate(examples):
        different = _different_answer(examples, index)
        if grade_math(example.meta["solution"], different) != 0.0:
            confused.append((example.id, example.answer, different))
    assert not confused, f"solutions graded 1 against a different answer: {confused}"


def test_aime24_reference_answers_grade(data_dir):
    task = tasks.get("aime24")
    examples = task.load(data_dir)
    assert len(examples) == 30
    for example in examples:
        assert task.grade(example, rf"Thus $m+n={example.answer}$, i.e. \boxed{{{example.answer}}}.") == 1.0
        assert task.grade(example, rf"\boxed{{{int(example.answer) + 1}}}") == 0.0


def test_math_train_reference_answers_grade(data_dir):
    task = tasks.get("math_train")
    examples = task.load(data_dir, limit=300, seed=0)
    failing = [(e.id, e.answer) for e in examples if task.grade(e, rf"\boxed{{{e.answer}}}") != 1.0]
    assert not failing


def test_authors_rule_takes_only_the_boxed_answer_or_the_answer_is():
    """The RLKV authors' reward (AReaL's extract_answer with use_last_number=False): no #### line and no
    last-number fallback, so a bare number at the end earns nothing."""
    from rlkv.tasks.grading import extract_answer, grade_math

    assert extract_answer("so \\boxed{12} then 13", "authors") == "12"
    assert extract_answer("Thus the final answer is 7.", "authors") == "7"
    assert extract_answer("... 3 + 4 = 7", "authors") is None and extract_answer("... 3 + 4 = 7") == "7"
    assert extract_answer("#### 42", "authors") is None and extract_answer("#### 42") == "42"
    assert grade_math("3 + 4 = 7", "7", "authors") == 0.0 and grade_math("3 + 4 = 7", "7") == 1.0
    with pytest.raises(ValueError, match="unknown answer rule 'loose'"):
        extract_answer("7", "loose")


def test_a_math_task_graded_by_another_rule_is_a_copy():
    from rlkv import tasks

    gsm8k = tasks.get("gsm8k")
    strict = gsm8k.with_answer_rule("authors")
    example = gsm8k.load(limit=1)[0]
    bare = f"The total is {example.answer}"
    assert gsm8k.grade(example, bare) == 1.0 and strict.grade(example, bare) == 0.0
    assert tasks.get("gsm8k").answer_rule == "rlkv"  # the registered task is unchanged
    with pytest.raises(ValueError, match="unknown answer rule"):
        gsm8k.with_answer_rule("loose")
