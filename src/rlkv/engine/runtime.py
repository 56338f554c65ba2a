"""What a method runs on inside the engine: `runtime_for(method, setup)` -> its store and attention.

One builder per method type, registered with `functools.singledispatch` (a new kind of method
registers its own): head splits and a full cache run on pages + rings (`rlkv.engine.kv`), token
droppers on fixed slots (`rlkv.engine.tokendrop`), `Gated` rollouts on pages with every head's
full cache and its alpha read in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import torch

from rlkv.attention.reference import block_window
from rlkv.engine.attention import EngineAttention, EngineState
from rlkv.engine.kv import KVStore
from rlkv.engine.store import Store
from rlkv.engine.tokendrop import TokenDropAttention, TokenDropStore
from rlkv.hf.gated import gated
from rlkv.methods.headsplit import HeadSplit
from rlkv.methods.tokendrop import TokenDrop
from rlkv.models import Layout


@dataclass
class Gated:
    """RL-rollout mode: every head keeps its full cache; output = alpha * full + (1 - alpha) * streaming.

    `alpha` [layers, kv_heads] is read in place at every step, so training can update it between calls.
    `block` is the streaming branch's granularity (`rlkv.attention.reference.keep_keys_mask`).
    """

    alpha: torch.Tensor
    sink: int = 128
    recent: int = 256
    block: int = 1

    def apply(self, model):
        """The same mix on transformers `generate` (`rlkv.hf.gated`)."""
        return gated(model, self.alpha, self.sink, self.recent, self.block)


@dataclass(frozen=True)
class Setup:
    """The engine's settings every builder may read."""

    layout: Layout
    budget: int  # KV bytes
    max_batch: int
    page_size: int
    max_seq_len: int
    sequence_tokens: int | None
    device: torch.device
    dtype: torch.dtype
    kernel: bool  # the Triton kernels (else the torch paths)


@dataclass
class Runtime:
    store: Store
    state: EngineState  # what the engine's attention function reads
    graphs: bool  # whether decode steps can be captured in CUDA graphs
    whole_prompts: bool  # prompts are prefilled in one piece, never in chunks


@singledispatch
def runtime_for(method, setup: Setup) -> Runtime:
    raise ValueError(
        f"the engine runs head-split methods (HeadSplit: full, streaming, rlkv, duo, random), token-dropping "
        f"methods (TokenDrop: h2o, snapkv, rkv) and Gated rollouts; got {type(method).__name__}"
    )


def _paged(
    setup: Setup, keep: torch.Tensor, sink: int, recent: int, alpha=None, full_prefill: bool = False, block: int = 1
) -> Runtime:
    store = KVStore(
        setup.layout,
        keep,
        sink,
        recent,
        setup.page_size,
        setup.budget,
        setup.max_batch,
        setup.max_seq_len,
        setup.device,
        setup.dtype,
        setup.sequence_tokens,
    )
    state = EngineAttention(store, setup.layout.group_size, alpha, setup.kernel, full_prefill, block)
    # the torch decode path reads the longest length on the host, so only the kernel's step is graphed
    return Runtime(store, state, graphs=setup.device.type == "cuda" and setup.kernel, whole_prompts=False)


@runtime_for.register(type(None))
def _full_cache(method: None, setup: Setup) -> Runtime:
    return _paged(setup, torch.ones(setup.layout.shape, dtype=torch.bool), 0, 1)


@runtime_for.register(HeadSplit)
def _head_split(method: HeadSplit, setup: Setup) -> Runtime:
    return _paged(setup, method.keep, method.sink, method.recent, full_prefill=method.prefill == "full")


@runtime_for.register(Gated)
def _gated(method: Gated, setup: Setup) -> Runtime:
    alpha, shape = method.alpha, setup.layout.shape
    if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != shape:
        raise ValueError(f"Gated alpha must be a tensor of shape {shape} (layers x kv_heads)")
    if alpha.device != setup.device:
        raise ValueError(
            f"Gated alpha is on {alpha.device} but the model on {setup.device}: the engine reads "
            "alpha in place, so keep it on the model's device"
        )
    sink, recent = block_window(method.sink, method.recent, method.block)
    return _paged(setup, torch.ones(shape, dtype=torch.bool), sink, recent, alpha=alpha.detach(), block=method.block)


@runtime_for.register(TokenDrop)
def _token_drop(method: TokenDrop, setup: Setup) -> Runtime:
    store = TokenDropStore(setup.layout, method.policy, setup.budget, setup.max_batch, setup.device, setup.dtype)
    return Runtime(
        store, TokenDropAttention(store, setup.kernel), graphs=setup.device.type == "cuda", whole_prompts=True
    )
