"""The grader's side of a verdict: how asserts are split, and what counts as plain data."""

import ast
import math
import time

import pytest

from rlkv.tasks import checks
from rlkv.tasks.sandbox import Limits, run_code

FAST = Limits(timeout=3)


def holes(test: str, tested=()) -> list[str]:
    (check,) = checks.plan((test,), frozenset(tested)).checks
    return [code.co_names for code in check.holes]


def test_only_the_calls_of_the_code_go_to_the_child():
    assert holes("assert f(1, [2]) == [3]") == [("f",)]
    assert holes("assert math.isclose(area(2), 12.56, rel_tol=0.001)") == [("area",)]
    assert holes("assert set(similar((1, 2), (2, 3))) == set((2,))") == [("similar",)]
    assert holes("assert sum(10, 15) == 6", tested={"sum"}) == [("sum",)]
    assert holes("assert f(x) == [i * i for i in range(3)] and not g()") == [
        ("f", "x"),
        ("g",),
    ]
    assert holes("assert obj.method(2)[0] == 1") == [("obj", "method")]


def test_the_grader_compares_exactly_what_the_assert_compares():
    plan = checks.plan(("assert math.isclose(f(2), 12.56, rel_tol=0.001)",))
    assert checks.passes(plan.checks[0], [12.5601]) and not checks.passes(plan.checks[0], [12.7])
    plan = checks.plan(("assert set(f()) == {1, 2}", "assert f()", "assert f() is None"))
    assert [checks.passes(c, v) for c, v in zip(plan.checks, [[[2, 1, 1]], [0], [None]])] == [True, False, True]


def test_tests_it_cannot_split_are_refused():
    with pytest.raises(ValueError, match="inside a lambda, comprehension"):
        checks.plan(("assert all(f(i) == i for i in range(3))",))
    with pytest.raises(ValueError, match="asserts must be top-level"):
        checks.plan(("for i in range(3):\n    assert f(i) == i",))
    with pytest.raises(ValueError, match="not valid Python"):
        checks.plan(("assert f(",))


def test_decode_takes_plain_data_only():
    assert checks.decode("[1, -2.5, 'a', b'b', None, True, (3,), {1: {2}}, frozenset([4])]") == [
        1, -2.5, "a", b"b", None, True, (3,), {1: {2}}, frozenset([4])
    ]  # fmt: skip
    assert checks.decode("[inf, -inf]") == [math.inf, -math.inf] and math.isnan(checks.decode("nan"))
    assert checks.decode("complex(1.0, -2.0)") == 1 - 2j and checks.decode("-0x10") == -16
    for text in [
        "__import__('os')",
        "x",
        "f()",
        "[1] * 3",
        "{[1]: 2}",
        "set([[1]])",
        "(" * 300 + ")" * 300,
    ]:
        with pytest.raises(ValueError, match="not plain data"):
            checks.decode(text)


def test_decode_refuses_values_built_to_collide_in_hash_tables_in_linear_time():
    """Numbers and tuples hash without salt: 41k integers with one hash made a set take the grader 10 s."""
    P = 2**61 - 1  # hash(k * P) == 0 for every k
    hostile = [
        "{" + ", ".join(str(k * P) for k in range(1, 41_001)) + "}",
        "[" + ", ".join(str(k * P) for k in range(1, 41_001)) + "]",  # a test may take set() of a list
        "[" + ", ".join(f"complex({1000003.0 * k}, {-float(k)})" for k in range(2, 20_000)) + "]",
        "[" + ", ".join(f"({k * P},)" for k in range(1, 20_000)) + "]",
    ]
    for text in hostile:
        start = time.process_time()
        ast.parse(text, mode="eval")
        parsing = time.process_time() - start  # the floor, which scales with the machine's load as decoding does
        start = time.process_time()
        with pytest.raises(ValueError, match="more than 8 distinct values share one hash"):
            checks.decode(text)
        assert time.process_time() - start < 4 * parsing + 0.5  # a set of the colliding values took 80x parsing
    honest = "[" + ", ".join(map(str, range(100_000))) + ", -1, -2, [0, 0, 0]]"  # hash(-1) == hash(-2)
    assert checks.decode(honest)[-3:] == [-1, -2, [0, 0, 0]]
    assert checks.decode("{" + ", ".join(f"{k}: ({k}, {k * P})" for k in range(8)) + "}")[7] == (7, 7 * P)


def test_values_round_trip_from_the_child():
    code = "import collections\nvalues = [[1, (2.5, 'x')], {3: None}, {4}, frozenset(), float('inf'), 2**9000, 1j]"
    code += "\ncounter = collections.Counter('aab')"
    tests = ["assert values == [[1, (2.5, 'x')], {3: None}, {4}, frozenset(), float('inf'), 2**9000, 1j]"]
    tests += ["assert counter == {'a': 2, 'b': 1}", "assert math.isnan(nan_of())"]
    result = run_code(code + "\ndef nan_of(): return float('nan')", tests, FAST)
    assert result.passed, result.details


def test_a_failing_assert_is_reported_before_a_later_error():
    result = run_code("def f(x): return x", ["assert f(1) == 2", "assert f(1) / 0"], FAST)
    assert result.status == "failed" and "test 0 failed" in result.details


def test_a_first_result_line_of_no_known_kind_is_an_error_naming_it():
    """The child's first line is "ok" or "raise ...": anything else (a candidate writing to the results
    descriptor) is one error verdict quoting the line, not a verdict nested in a verdict."""
    from rlkv.tasks.sandbox import _verdict

    plan = checks.plan(("assert f(1) == 2",), frozenset({"f"}))
    assert _verdict(["forged line"], plan, ["assert f(1) == 2"]) == ("error", "unexpected result line 'forged line'")
    assert _verdict(["raise ValueError: x"], plan, ["assert f(1) == 2"]) == (
        "error",
        "the solution raised ValueError: x",
    )
