"""Compression methods by name: each turns (model layout, sparsity) into what a runtime applies.

    method = rlkv.methods.build("rlkv", layout, sparsity=0.5, heads="heads.json")
    with method.apply(model):
        model.generate(...)

Head-split methods (full, streaming, rlkv, duo, random) decide per KV head: keep every token or
only sink + recent. They share `HeadSplit`; they differ only in where the head ranking comes from.
Token-dropping methods (h2o, snapkv, rkv) keep a per-head budget of tokens chosen by attention
scores; they share the `tokendrop` runtime and need `budget=`. Every method takes `kv_dtype=` (the
precision its K/V are stored at, `rlkv.precision`: "bf16", "fp8", or for head splits "fp8-kept").
"""

from __future__ import annotations

from dataclasses import replace

from rlkv.methods.h2o import build_h2o
from rlkv.methods.headsplit import HeadSplit, build_headsplit
from rlkv.methods.rkv import build_rkv
from rlkv.methods.snapkv import build_snapkv
from rlkv.precision import check_kv_dtype

BUILDERS = {
    "full": build_headsplit,
    "streaming": build_headsplit,
    "rlkv": build_headsplit,
    "duo": build_headsplit,
    "random": build_headsplit,
    "h2o": build_h2o,
    "snapkv": build_snapkv,
    "rkv": build_rkv,
}


HEAD_RANKED = ("rlkv", "duo", "random")  # head split by a ranking: sized by sparsity
TOKEN_DROPPING = ("h2o", "snapkv", "rkv")  # sized by a token budget per KV head


def names() -> list[str]:
    return list(BUILDERS)


def check_name(name: str) -> str:
    """`name` if it is a registered method, else a one-line error naming the registered ones."""
    if name not in BUILDERS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(BUILDERS)}")
    return name


def check_kv_dtype_for(name: str, kv_dtype: str) -> str:
    """`kv_dtype` if method `name` can store K/V so (a token dropper keeps no head whole: no "fp8-kept")."""
    if check_kv_dtype(kv_dtype) == "fp8-kept" and name in TOKEN_DROPPING:
        raise ValueError(f"--kv-dtype fp8-kept keeps a head split's kept heads in FP8; {name} keeps no head whole")
    return kv_dtype


def build(name: str, layout, sparsity: float, kv_dtype: str | None = None, **kwargs):
    """The method `name` for a model of `layout` at `sparsity`, its K/V at `kv_dtype` (see each builder for kwargs)."""
    method = BUILDERS[check_name(name)](name, layout, sparsity, **kwargs)
    return method if kv_dtype is None else replace(method, kv_dtype=kv_dtype)


__all__ = ["HEAD_RANKED", "TOKEN_DROPPING", "HeadSplit", "build", "check_kv_dtype_for", "check_name", "names"]
