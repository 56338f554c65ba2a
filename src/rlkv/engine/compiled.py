"""The decode step compiled: torch.compile fuses what runs between the engine's attention calls.

A decode step of a few hundred sequences is mostly not attention: every layer runs its norms, RoPE,
activation and residual adds as separate small kernels around the matrix products
(`benchmarks/decode_limit.py`: about 4 ms of each step of Qwen2.5-1.5B, whatever the batch). With
`Engine(compile=True)`, the default on CUDA, the model's own modules are compiled (inductor) into
fewer, fused kernels, around the engine's attention, which stays one opaque operator
(`rlkv.engine.attention.engine_attention`): the compiler never traces the KV store, the Triton
kernels or the batch's host-side description, as vLLM compiles its models around its attention op.
The engine's CUDA graphs then replay the compiled step.

The batch dimension is symbolic, so one compilation serves every batch size; torch specialises a
dimension of 1, so the runner pads a single row with a scratch row (`Runner.min_rows`). Sampling
is compiled apart, a small graph per mode, so that a new mode does not trace the model again.
torch keeps the compiled code per function and guards, so engines on a model of the same class
reuse it within a process (and inductor's disk cache across processes).
"""

from __future__ import annotations

import os

import torch
import torch._dynamo

BACKEND = "inductor"  # the tests trace with "aot_eager" (same graph, no code generation) where inductor is too slow
# torch keeps one cache per function: every model configuration and sampling mode an engine compiles is an entry of
# the same ones (`Runner.forward`; the wrapper dynamo puts around `pick`'s partial), and a process with engines
# on several models (the tests, a notebook) would reach dynamo's default of 8, an error under fullgraph
RECOMPILE_LIMIT = 64


def compile_by_default() -> bool:
    """Whether engines on CUDA compile when not told: yes, unless the environment says RLKV_COMPILE=0 (vLLM's
    --enforce-eager, for every engine a command builds: rlkv serve, eval, identify's rollouts)."""
    value = os.environ.get("RLKV_COMPILE", "1").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", ""):
        raise ValueError(f"RLKV_COMPILE must be 0 or 1 (off / on), got {value!r}")
    return value not in ("0", "off", "false")


def failure(err: Exception) -> str:
    """A compiler error in one line for a log (inductor's run to pages; the traceback goes with the record)."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}"


def compiled(fn):
    """`fn` compiled whole (fullgraph: a graph break would be a silent slow path), every tensor argument's first
    dimension (the batch, at least 2) symbolic."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    step = torch.compile(fn, backend=BACKEND, fullgraph=True)

    def call(*args):
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.ndim:
                torch._dynamo.mark_dynamic(arg, 0)
        return step(*args)

    return call
