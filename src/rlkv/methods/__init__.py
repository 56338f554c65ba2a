"""Compression methods by name: each turns (model layout, sparsity) into what a runtime applies.

    method = rlkv.methods.build("rlkv", layout, sparsity=0.5, heads="heads.json")
    with method.apply(model):
        model.generate(...)

Head-split methods (full, streaming, rlkv, duo, random) decide per KV head: keep every token or
only sink + recent. They share `HeadSplit`; they differ only in where the head ranking comes from.
"""

from __future__ import annotations

from rlkv.methods.headsplit import HeadSplit, build_headsplit

BUILDERS = {
    "full": build_headsplit,
    "streaming": build_headsplit,
    "rlkv": build_headsplit,
    "duo": build_headsplit,
    "random": build_headsplit,
}


def names() -> list[str]:
    return list(BUILDERS)


def build(name: str, layout, sparsity: float, **kwargs):
    """The method `name` for a model of `layout` at `sparsity` (see each builder for kwargs)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(BUILDERS)}")
    return BUILDERS[name](name, layout, sparsity, **kwargs)


__all__ = ["HeadSplit", "build", "names"]
