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
# the most tokens a top-k filter selects without sorting the vocabulary (`top_k_candidates`): covers the usual
# settings (Qwen's 20, transformers' default 50, 100)
TOP_K_CANDIDATES = 128
# from this many rows on, CUDA finds a filter's thresholds with `rlkv.engine.nucleus`'s kernels, below by a sort:
# where the kernels overtake the sort, as `benchmarks/engine.py --parts sampling` times them (top-p 0.95 over 151,936
# logits on an H100: 128 rows for a program per row, results/engine_qwen15_sampling_kernel_h100.json; the kernels
# that spread each row over many programs are not timed yet)
KERNEL_ROWS = 128


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


def vocab_keys(vocab: int, device=None) -> torch.Tensor:
    """The hashed vocabulary ids [vocab] (int64) that `uniform` mixes with each row's key.

    A compiled decode step takes them as a constant computed here, eagerly: inductor folds `arange * constant`
    into int32 index arithmetic, which overflows on the golden-ratio constant (a Triton compile error, or
    silently wrong values for smaller constants: pytorch/pytorch#175966)."""
    return _mix32(torch.arange(vocab, device=device, dtype=torch.int64) * 0x9E3779B1 & _M32)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1), float32 [B, V], a pure function of (seed, step, vocabulary id); `keys`: `vocab_keys`
    [V], or per row [B, N] (the keys of each row's candidate tokens: the noise [B, N] those tokens get in [B, V])."""
    key = _mix32(_mix32(seeds & _M32) ^ _mix32((seeds >> 32) & _M32) ^ _mix32(steps & _M32))
    bits = _mix32(key[:, None] ^ (keys if keys.ndim == 2 else keys[None, :]))
    return ((bits >> 8).float() + 0.5) / 2.0**24


def _per_row(value, rows: int, dtype, device) -> torch.Tensor:
    """A number or a per-row tensor as a tensor [rows]."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.full((rows,), value, dtype=dtype, device=device)


def _sorted_threshold(ordered: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Each row's smallest kept logit [B] (`filter_logits`' rule) from its logits in descending order [B, N]. `top_k`
    (0 = off) and `top_p` (1 = off) are numbers or per-row tensors [B]."""
    rows, n = ordered.shape
    top_k = _per_row(top_k, rows, torch.long, ordered.device)
    top_p = _per_row(top_p, rows, torch.float32, ordered.device)
    k = torch.where(top_k > 0, top_k.clamp(max=n), n)
    drop = ordered < ordered.gather(1, (k - 1)[:, None])  # outside the top-k (those tied with the k-th stay)
    probs = torch.softmax(ordered.float().masked_fill(drop, float("-inf")), dim=-1)
    drop |= (probs.cumsum(-1) - probs > top_p[:, None]) & (top_p < 1)[:, None]  # predecessors cover top_p
    return ordered.masked_fill(drop, float("inf")).amin(-1)


def threshold_by_sort(scaled: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """`nucleus_threshold` by a sort of each row (what it runs on a CPU and for a few rows)."""
    return _sorted_threshold(scaled.sort(dim=-1, descending=True).values, top_k, top_p)


@torch.library.custom_op("rlkv::nucleus_threshold", mutates_args=())
def nucleus_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's smallest kept logit [B] (float32) of `scaled` [B, V] (float32) under its `top_k` [B] and `top_p`
    [B]: on CUDA for KERNEL_ROWS rows or more a Triton kernel that searches for it (`rlkv.engine.nucleus`), else
    from a sort of the rows. The two agree but where float32 sums of the nucleus's mass round differently. An
    operator of its own, so that a compiled step runs it as it is (inductor cannot compile the sort's cumsum over a
    large vocabulary: its split scan fails on CUDA, torch 2.11)."""
    if scaled.is_cuda and scaled.shape[0] >= KERNEL_ROWS:
        from rlkv.engine.nucleus import nucleus_threshold_kernel

        return nucleus_threshold_kernel(scaled, top_k, top_p)
    return threshold_by_sort(scaled, top_k, top_p)


@nucleus_threshold.register_fake
def _(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return scaled.new_empty(scaled.shape[0], dtype=torch.float32)


def filter_logits(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Logits with everything outside each row's top-k and top-p nucleus set to -inf: the best token always stays,
    and so do the tokens tied with the last one kept. `top_k` (0 = off) and `top_p` (1 = off) are numbers or per-row
    tensors [B]."""
    rows = logits.shape[0]
    top_k = _per_row(top_k, rows, torch.long, logits.device)
    top_p = _per_row(top_p, rows, torch.float32, logits.device)
    scaled = logits.float().contiguous()
    return logits.masked_fill(scaled < nucleus_threshold(scaled, top_k, top_p)[:, None], float("-inf"))


def selects(top_ks) -> bool:
    """Whether a batch whose sampled rows ask for these top-k settings can select candidates (`top_k_candidates`)
    instead of sorting the vocabulary: every one on and at most TOP_K_CANDIDATES."""
    return all(0 < k <= TOP_K_CANDIDATES for k in top_ks)


def top_k_candidates(logits: torch.Tensor, top_k, top_p, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`filter_logits` for rows whose top-k is on and at most `candidates`, without sorting the vocabulary: each row's
    `candidates` best logits [B, N] (descending; those outside its top-k and top-p nucleus set to -inf) and their
    token ids [B, N]. One top-k selection instead of a sort of [B, V]; the nucleus is the same, since top-p is
    taken within the top-k tokens either way (but for tokens tied with the k-th best beyond the candidates)."""
    ordered, order = logits.topk(min(candidates, logits.shape[-1]), dim=-1)
    return ordered.masked_fill(ordered < _sorted_threshold(ordered, top_k, top_p)[:, None], float("-inf")), order


def sample(
    logits: torch.Tensor,
    temperature,
    top_k,
    top_p,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    filtered: bool = True,
    keys: torch.Tensor | None = None,
    candidates: int | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy where the temperature is 0, else seeded sampling.

    `temperature`, `top_k`, `top_p` are numbers (one setting for the batch) or per-row tensors [B];
    `filtered=False` skips the top-k / top-p filter (the caller knows no row uses it); `candidates`: the caller
    knows every sampled row's top-k is on and at most this, so the filter selects that many tokens per row
    (`top_k_candidates`) instead of sorting the vocabulary, and draws among them: the same tokens. `keys`:
    `vocab_keys(V)`, made here when not given (a compiled caller passes them). A temperature of exactly 0 as a
    number is plain argmax."""
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return logits.argmax(-1)
    temp = _per_row(temperature, logits.shape[0], torch.float32, logits.device)
    scaled = logits.float() / temp.clamp(min=1e-6)[:, None]
    keys = vocab_keys(logits.shape[-1], logits.device) if keys is None else keys
    if candidates is not None:
        scaled, order = top_k_candidates(scaled, top_k, top_p, candidates)
        gumbel = -torch.log(-torch.log(uniform(seeds, steps, keys[order])))
        drawn = order.gather(1, (scaled + gumbel).argmax(-1, keepdim=True))[:, 0]
    else:
        if filtered:
            scaled = filter_logits(scaled, top_k, top_p)
        gumbel = -torch.log(-torch.log(uniform(seeds, steps, keys)))
        drawn = (scaled + gumbel).argmax(-1)
    return torch.where(temp == 0, logits.argmax(-1), drawn)
