"""Token sampling with per-request seeds that do not depend on the batch a request lands in.

Randomness is a counter-based hash of (request seed, step, vocabulary id): request r's k-th
token is drawn with the same noise whichever other requests run beside it, on CPU and GPU
alike. Sampling is Gumbel-max over the temperature-scaled, top-k / top-p filtered logits,
which draws exactly from the filtered softmax.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def stable_seed(*parts) -> int:
    """A request seed from anything printable (run seed, task, example id ...): the same in every process."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), float32 [B, vocab], a pure function of (seed, step, vocabulary id)."""
    key = _mix32(_mix32(seeds & _M32) ^ _mix32((seeds >> 32) & _M32) ^ _mix32(steps & _M32))
    ids = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x9E3779B1 & _M32)
    bits = _mix32(key[:, None] ^ ids[None, :])
    return ((bits >> 8).float() + 0.5) / 2.0**24


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf (the best token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens whose predecessors already cover top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seeds: torch.Tensor,
           steps: torch.Tensor) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else seeded sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform(seeds, steps, logits.shape[-1])))
    return (scaled + gumbel).argmax(-1)
