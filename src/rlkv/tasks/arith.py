"""A procedurally generated multi-step arithmetic task whose reasoning must look back.

Each problem introduces several named people with item counts, then lists numbered events
that move items between them by name ("Ben gives 3 marbles to Ava", "Cleo receives as many
marbles as Dev had at the start"), and asks for one person's final count. Solving it means
tracking every count through the chain and reaching back to numbers stated at the very start
of the prompt: exactly the long-range retrieval a compressed KV cache can break. The person
asked about is the one whose count depends on the most events.

Problems need no files and are reproducible: problem ``i`` depends only on
``(seed, difficulty, i)``, so the same seed gives identical problems, other seeds other ones,
and a smaller ``limit`` gives a prefix. ``difficulty`` k >= 1 sets 2 + k people (at most 12)
and 3k events. Answers are integers; ``meta["solution"]`` holds a worked solution ending in
``\\boxed{answer}``.
"""

from __future__ import annotations

import os
import random

from rlkv.tasks.base import Example, MathTask

NAMES = ("Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena")
ITEMS = ("marble", "coin", "sticker", "card", "shell", "stamp")
DEFAULT_SIZE = 500
_MAX_COUNT = 999


def _some(n: int, item: str) -> str:
    return f"{n} {item}" if n == 1 else f"{n} {item}s"


def _events(
    rng: random.Random, start: dict[str, int], steps: int, item: str
) -> tuple[list[str], list[str], dict[str, int], str]:
    """Apply ``steps`` random valid events: (event texts, worked lines, final counts, target).

    The target is the person whose final count depends on the most events, so that the
    question needs as much of the chain as possible.
    """
    count = dict(start)
    depends = {name: set() for name in start}
    texts: list[str] = []
    work: list[str] = []
    for number in range(1, steps + 1):
        a, b = rng.sample(list(count), 2)
        options = []  # (text, change per person, person whose current count is read)
        if count[a] >= 1:
            n = rng.randint(1, count[a])
            options.append((f"{a} gives {_some(n, item)} to {b}.", {a: -n, b: n}, None))
            options.append((f"{a} loses {_some(n, item)}.", {a: -n}, None))
        n = rng.randint(1, 20)
        options.append((f"{a} finds {n} more {item}{'s' if n > 1 else ''}.", {a: n}, None))
        if 0 < count[a] <= _MAX_COUNT // 2:
            options.append((f"{a}'s number of {item}s doubles.", {a: count[a]}, None))
        if count[a] + count[b] <= _MAX_COUNT:
            options.append((f"{a} receives as many {item}s as {b} has now.", {a: count[b]}, b))
        if count[a] + start[b] <= _MAX_COUNT:
            options.append((f"{a} receives as many {item}s as {b} had at the start.", {a: start[b]}, None))
        text, change, read = rng.choice(options)
        arithmetic = [
            f"{who} {count[who]} {'+' if d >= 0 else '-'} {abs(d)} = {count[who] + d}" for who, d in change.items()
        ]
        for who, d in change.items():
            count[who] += d
            depends[who] |= {number} | (depends[read] if read else set())
        texts.append(text)
        work.append(f"Event {number}: {text} " + ", ".join(arithmetic) + ".")
    target = max(start, key=lambda name: len(depends[name]))
    return texts, work, count, target


def generate(seed: int, difficulty: int, index: int) -> Example:
    """Problem ``index`` of the stream for ``(seed, difficulty)``."""
    rng = random.Random(f"rlkv-arith:{seed}:{difficulty}:{index}")
    people = rng.sample(NAMES, min(2 + difficulty, len(NAMES)))
    item = rng.choice(ITEMS)
    start = {name: rng.randint(2, 30) for name in people}
    texts, work, final, target = _events(rng, start, 3 * difficulty, item)
    holdings = ", ".join(f"{name} has {_some(n, item)}" for name, n in start.items())
    question = (
        f"At the start, {holdings}.\nThen these events happen, in order:\n"
        + "\n".join(f"{i}. {text}" for i, text in enumerate(texts, start=1))
        + f"\nHow many {item}s does {target} have at the end?"
    )
    solution = (
        "Start: "
        + ", ".join(f"{name} {n}" for name, n in start.items())
        + ".\n"
        + "\n".join(work)
        + f"\nAt the end {target} has {_some(final[target], item)}, so the answer is \\boxed{{{final[target]}}}."
    )
    return Example(
        id=f"arith-d{difficulty}-s{seed}-{index}",
        question=question,
        answer=str(final[target]),
        meta={"seed": seed, "difficulty": difficulty, "start": start, "events": texts, "solution": solution},
    )


class Arith(MathTask):
    name = "arith"
    default_max_new_tokens = 4096

    def load(
        self,
        data_dir: str | os.PathLike | None = None,
        limit: int | None = None,
        seed: int | None = 0,
        difficulty: int = 3,
    ) -> list[Example]:
        """``limit`` (default DEFAULT_SIZE) problems of ``difficulty`` from stream ``seed``.

        ``data_dir`` is accepted for the common signature and ignored: nothing is read.
        """
        if not isinstance(difficulty, int) or difficulty < 1:
            raise ValueError(f"difficulty must be an integer >= 1, got {difficulty!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        seed = 0 if seed is None else seed
        return [generate(seed, difficulty, index) for index in range(DEFAULT_SIZE if limit is None else limit)]
