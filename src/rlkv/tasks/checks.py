"""Split test asserts so that the sandboxed code computes values and the grader compares them.

For each top-level ``assert`` of a test, the subexpressions that need the code under test
(calls of, attributes of, or names it or a test defines: the *holes*) are sent to the child,
which returns their values as plain data; everything else, the expected values and the
comparison itself (``==``, ``math.isclose``, ``set(...) == set(...)``, plain truthiness ...),
is evaluated here, in the grader, on those values. A candidate therefore cannot forge a pass
with an object whose ``__eq__`` is always true, by replacing ``exec``, or by writing to its
result channel: at most it can return values, and only the right ones pass. Other statements
of a test (set-up code) run in the child. A name counts as the grader's only if it is in
:data:`GRADER_NAMES` and not in ``tested`` or defined by a test.
"""

from __future__ import annotations

import ast
import builtins
import cmath
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import CodeType

from rlkv.excerpt import excerpt

_PURE_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "chr", "complex", "dict", "divmod",
    "enumerate", "filter", "float", "format", "frozenset", "hex", "int", "isinstance", "len",
    "list", "map", "max", "min", "oct", "ord", "pow", "range", "repr", "reversed", "round",
    "set", "slice", "sorted", "str", "sum", "tuple", "type", "zip",
)  # fmt: skip
GRADER_NAMES = {name: getattr(builtins, name) for name in _PURE_BUILTINS} | {"math": math, "cmath": cmath}
"""What a test's expected side and comparison may use in the grader."""
_GRADER_SIDE = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Tuple, ast.List, ast.Set, ast.Dict)
_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.NamedExpr)


@dataclass(frozen=True)
class Check:
    """One top-level assert: its holes (child-side code) and the grader-side test of their values."""

    index: int
    source: str
    holes: tuple[CodeType, ...]
    test: CodeType


@dataclass(frozen=True)
class Plan:
    """What the child runs (``("exec", code)`` or ``("eval", holes)`` steps) and the checks of
    the ``"eval"`` steps, in order; ``steps[i]`` is test ``step_tests[i]``."""

    steps: tuple[tuple[str, CodeType | tuple[CodeType, ...]], ...]  # ("exec", code) or ("eval", holes)
    step_tests: tuple[int, ...]
    checks: tuple[Check, ...]


def _bound_names(statements: Sequence[ast.stmt]) -> set[str]:
    names = set()
    for node in ast.walk(ast.Module(body=list(statements), type_ignores=[])):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
    return names


def _local_names(expression: ast.AST) -> set[str]:
    """Names an expression binds itself (comprehension targets, lambda arguments, ``:=``)."""
    nodes = list(ast.walk(expression))
    names = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return names | {n.arg for n in nodes if isinstance(n, ast.arg)}


class _Splitter:
    def __init__(self, theirs: set[str], local: set[str], label: str):
        self.theirs, self.local, self.label, self.holes = theirs, local, label, []

    def needs_code(self, node: ast.AST) -> bool:
        return any(
            isinstance(n, ast.Name) and n.id not in self.local and (n.id in self.theirs or n.id not in GRADER_NAMES)
            for n in ast.walk(node)
        )

    def split_expr(self, node: ast.expr) -> ast.expr:
        """`split` of an expression, which is an expression again (itself, or the name of its hole)."""
        split = self.split(node)
        assert isinstance(split, ast.expr)
        return split

    def split(self, node: ast.AST) -> ast.AST:
        if not self.needs_code(node):
            return node
        if isinstance(node, _SCOPES):
            raise ValueError(
                f"{self.label}: the code under test is used inside a lambda, comprehension or ':=', "
                "which the grader cannot check outside the sandbox; write plain asserts on its calls"
            )
        head = {ast.Call: "func", ast.Attribute: "value", ast.Subscript: "value"}.get(type(node))
        if isinstance(node, _GRADER_SIDE) or (head and not self.needs_code(getattr(node, head))):
            for field, value in ast.iter_fields(node):
                if isinstance(value, list):
                    setattr(node, field, [self.split(v) if isinstance(v, ast.AST) else v for v in value])
                elif isinstance(value, ast.AST) and not isinstance(value, ast.expr_context):
                    setattr(node, field, self.split(value))
            return node
        if isinstance(node, ast.keyword):
            node.value = self.split_expr(node.value)
            return node
        if not isinstance(node, ast.expr):
            raise ValueError(f"{self.label}: the grader cannot check a {type(node).__name__} outside the sandbox")
        hole = ast.Name(id=f"_rlkv_hole_{len(self.holes)}", ctx=ast.Load())
        self.holes.append(compile(ast.Expression(body=node), self.label, "eval"))
        return ast.copy_location(hole, node)


def _check(statement: ast.Assert, index: int, source: str, theirs: set[str]) -> Check:
    label = f"<test {index}>"
    splitter = _Splitter(theirs, _local_names(statement.test), label)
    tree = ast.fix_missing_locations(ast.Expression(body=splitter.split_expr(statement.test)))
    return Check(index=index, source=source, holes=tuple(splitter.holes), test=compile(tree, label, "eval"))


@functools.lru_cache(maxsize=4096)
def plan(tests: tuple[str, ...], tested: frozenset[str] = frozenset()) -> Plan:
    """The plan for ``tests``; ``tested``: names the code defines that tests call even where
    they shadow a builtin (MBPP task 11 tests a ``sum``). ValueError for a test it cannot split."""
    parsed = []
    for index, test in enumerate(tests):
        try:
            parsed.append(ast.parse(test, f"<test {index}>"))
        except SyntaxError as e:
            raise ValueError(f"test {index} is not valid Python ({e.msg}): {excerpt(test, 200)!r}") from None
    theirs = set(tested) | _bound_names([s for module in parsed for s in module.body if not isinstance(s, ast.Assert)])
    steps, step_tests, checks = [], [], []
    for index, (module, test) in enumerate(zip(parsed, tests)):
        pending: list[ast.stmt] = []
        for statement in module.body + [None]:
            if pending and (statement is None or isinstance(statement, ast.Assert)):
                code = compile(ast.Module(body=pending, type_ignores=[]), f"<test {index}>", "exec")
                steps.append(("exec", code))
                step_tests.append(index)
                pending = []
            if isinstance(statement, ast.Assert):
                check = _check(statement, index, test, theirs)
                steps.append(("eval", check.holes))
                step_tests.append(index)
                checks.append(check)
            elif statement is not None:
                if any(isinstance(node, ast.Assert) for node in ast.walk(statement)):
                    raise ValueError(f"test {index}: asserts must be top-level statements: {excerpt(test, 200)!r}")
                pending.append(statement)
    return Plan(steps=tuple(steps), step_tests=tuple(step_tests), checks=tuple(checks))


def passes(check: Check, values: Sequence[object]) -> bool:
    """Whether ``check`` holds for its holes' ``values`` (evaluated here, on plain data)."""
    names = {"__builtins__": {}, **GRADER_NAMES} | {f"_rlkv_hole_{i}": value for i, value in enumerate(values)}
    return bool(eval(check.test, names))


_LITERAL_NAMES = {"inf": math.inf, "nan": math.nan}
MAX_SHARED_HASH = 8
"""Distinct values of one decoded value that may share a hash. Python's hashes of numbers and tuples are
not salted, so a candidate can choose thousands of values with one hash, which make every set or dict
built of them (by :func:`decode`, or by a test's ``set(...)``) take quadratic time in the grader; no
honest value comes near this many (``hash(-1) == hash(-2)`` is the one pair among small integers)."""


class _Hashes:
    """Every hashable part of a value being decoded, by hash; refuses a value built to collide."""

    def __init__(self):
        self._by_hash: dict[int, list] = {}

    def add(self, value: object) -> object:
        try:
            key = hash(value)
        except TypeError:  # a list, dict or set: its parts were added one by one
            return value
        same = self._by_hash.setdefault(key, [])
        if not any(other == value for other in same):
            if len(same) == MAX_SHARED_HASH:
                raise ValueError(f"not plain data (more than {MAX_SHARED_HASH} distinct values share one hash)")
            same.append(value)
        return value


def _literal(node: ast.AST, hashes: _Hashes) -> object:
    """The value of a literal node; each part goes through ``hashes`` before any set or dict holds it."""
    return hashes.add(_parts(node, hashes))


def _parts(node: ast.AST, hashes: _Hashes) -> object:
    if isinstance(node, ast.Constant) and not isinstance(node.value, type(...)):
        return node.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand, hashes)
        if type(value) is int or type(value) is float:  # not bool, not a subclass
            return -value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(item, hashes) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Set):
        return {_literal(item, hashes) for item in node.elts}
    if isinstance(node, ast.Dict):
        keys = [k for k in node.keys if k is not None]  # a None key is a ** unpacking
        if len(keys) == len(node.keys):
            return {_literal(k, hashes): _literal(v, hashes) for k, v in zip(keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        kind = {"set": set, "frozenset": frozenset, "complex": complex}.get(node.func.id)
        args = [_literal(arg, hashes) for arg in node.args]
        if kind is complex and len(args) == 2:
            real, imag = args
            if type(real) is float and type(imag) is float:
                return complex(real, imag)
        if kind in (set, frozenset) and len(args) == 1 and isinstance(args[0], list):
            return kind(args[0])
    raise ValueError(f"not plain data: {excerpt(ast.dump(node), 100)}")


def decode(text: str) -> object:
    """A value the child encoded (see ``_sandbox_child._encode``); ValueError if it is anything else, or if
    its parts are built to collide in hash tables (see :data:`MAX_SHARED_HASH`). Linear in ``text``."""
    try:
        return _literal(ast.parse(text, mode="eval").body, _Hashes())
    except (SyntaxError, RecursionError, MemoryError, TypeError) as e:
        raise ValueError(f"not plain data ({type(e).__name__})") from None
