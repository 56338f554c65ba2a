"""Grade a math completion by its final answer, with math-verify as the judge.

Grading happens in two deliberately separate stages:

1. **Extraction** (:func:`extract_answer`) reduces the completion to the one string that is
   its final answer, by the first rule that applies: if it boxes answers, the last non-empty
   ``\\boxed{...}`` (balanced braces, so ``\\boxed{\\frac{1}{2}}`` is read whole; an echoed
   ``\\boxed{}`` is passed over, and one cut off by the token limit means no answer), else the
   last GSM8K-style ``#### N`` line, else the last "answer is X", else the last number in the
   text. Only this string is ever graded: a right number earlier in the reasoning earns nothing.
   The "authors" rule (the RLKV authors' reward, AReaL's ``extract_answer(..., use_last_number=False)``)
   stops after the boxed answer and "answer is": no ``####`` line and no last-number fallback.
2. **Comparison** (:func:`is_equivalent`) wraps the reference and the extracted answer in
   ``\\boxed{}`` and lets math-verify parse both to SymPy and compare them. It knows LaTeX
   fractions against decimals, ``\\text{ cm}`` units, ``\\$``, ``1,000``, percent and degrees.

Parsing only the short extracted string, and caching parses, keeps grading fast. math-verify's
timeouts rely on ``signal.alarm``, which works only in the main thread, so they are used there
and switched off in other threads (where a pathological expression can then take long).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

TIMEOUT_SECONDS = 3
"""Limit for one math-verify parse or comparison (main thread only)."""

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_DOLLAR = re.compile(r"(?<!\\)\$")
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if
    there is none or it is cut off before its closing brace."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        else:
            return None
        content = text[match.end() : end].strip()
        if content:
            return content
    return None


ANSWER_RULES = {"rlkv": (_HASHES, _ANSWER_IS, _NUMBER), "authors": (_ANSWER_IS,)}
"""Where an answer is looked for after the last boxed one, by rule (see the module docstring)."""


def extract_answer(completion: str, rule: str = "rlkv") -> str | None:
    """The final answer of ``completion`` by ``rule`` (see the module docstring), or None if it has none."""
    if rule not in ANSWER_RULES:
        raise ValueError(f"unknown answer rule {rule!r}: expected one of {', '.join(ANSWER_RULES)}")
    if _BOXED.search(completion):
        return last_boxed(completion)
    for pattern in ANSWER_RULES[rule]:
        matches = pattern.findall(completion)
        if matches:
            return matches[-1].strip()
    return None


def _timeout() -> int:
    """math-verify's parsing timeout: its alarm signal works in the main thread only (0: none)."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else 0


@lru_cache(maxsize=8192)
def _parse(answer: str, timeout: int) -> tuple:
    text = _DOLLAR.sub("", answer).strip().rstrip(".").strip()
    return tuple(parse("\\boxed{" + text + "}", extraction_config=_EXTRACTION, parsing_timeout=timeout))


def is_equivalent(reference: str, answer: str) -> bool:
    """Whether the extracted ``answer`` means the same as ``reference`` (both short strings)."""
    timeout = _timeout()
    gold, pred = _parse(reference, timeout), _parse(answer, timeout)
    return bool(gold and pred) and verify(list(gold), list(pred), timeout_seconds=timeout)


def grade_math(completion: str, reference: str, rule: str = "rlkv") -> float:
    """1.0 if the final answer of ``completion`` (extracted by ``rule``) equals ``reference``, else 0.0."""
    answer = extract_answer(completion, rule)
    return float(answer is not None and is_equivalent(reference, answer))
