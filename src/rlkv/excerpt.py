"""A long text shortened for a one-line message: whole sentences or words, never a word cut in two.

Errors quote what they found (a library's own error, a line of a file); `excerpt` keeps such a
quote short without leaving half a word that reads like a typo.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"


def excerpt(text: str, width: int = 120) -> str:
    """`text`'s first line in at most `width` characters: whole when it fits, else its first sentences
    that fit, else its first words that fit followed by an ellipsis."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(line) <= width:
        return line
    sentences = [m.end() for m in re.finditer(r"[.!?](?=\s)", line) if m.end() <= width]
    if sentences:
        return line[: sentences[-1]]
    cut = line.rfind(" ", 0, width)  # the ellipsis takes the space's place
    return (line[:cut] if cut > 0 else line[: width - 1]).rstrip(" ,;:") + ELLIPSIS
