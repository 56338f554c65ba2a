"""Where a compressed head keeps a token: the sink + recent ring, written once for every runtime.

A compressed KV head stores the first `sink` tokens for good and the last `recent` in a ring:
token position p lives in slot p while p < sink, else in slot sink + (p - sink) mod recent. The
transformers cache (`rlkv.hf.splitcache`), the engine's stores and torch paths (`rlkv.engine`) use
these functions; the engine's Triton kernel (`rlkv.engine.kernel._decode_kernel`) spells the same
rule inline and is tested against the torch path.
"""

from __future__ import annotations

import torch


def ring_slot(pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Ring slot of a token position: sinks have their own slots, the rest cycle through `recent`."""
    return torch.where(pos < sink, pos, sink + (pos - sink).remainder(recent))


def ring_positions(lengths: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Token position held by each ring slot [n, sink + recent] after `lengths` [n] tokens (-1: empty)."""
    last = lengths[:, None] - 1
    j = torch.arange(sink + recent, device=lengths.device)[None, :]
    pos = torch.where(j < sink, j, last - (last - j).remainder(recent))
    valid = torch.where(j < sink, j <= last, pos >= sink)
    return torch.where(valid, pos, -1)


def query_heads(keep: torch.Tensor, group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the query heads of a layer's kept and of its compressed KV heads (`keep` [kv_heads]):
    a GQA group of `group` query heads follows its KV head."""
    q_keep = keep.repeat_interleave(group).to(device)
    return torch.nonzero(q_keep).flatten(), torch.nonzero(~q_keep).flatten()
