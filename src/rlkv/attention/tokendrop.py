"""The token-dropping rule shared by both runtimes (transformers' `rlkv.hf.tokendrop` and the engine's
`rlkv.engine.tokendrop`): what a `Policy` chooses from, and the attention over candidates.

Token-dropping baselines keep, per layer and per KV head, a bounded set of tokens chosen by
attention statistics (H2O, Zhang et al. 2023, arXiv:2306.14048; SnapKV, Li et al. 2024,
arXiv:2404.14469; R-KV, Cai et al. 2025, arXiv:2505.24133). They differ only in a `Policy`
(`rlkv.methods.h2o`, `snapkv`, `rkv`): which candidates to keep. Candidates are the stored slots
followed by the new tokens, each with its position; every query attends over them with an
explicit softmax (`candidate_attention`), the policy reads the attention the last observed
queries paid and returns a keep mask, and `compact` stores the kept ones in chronological order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK = 256  # queries per explicit-softmax block: memory is O(CHUNK x keys) per head


@dataclass
class Candidates:
    """What a policy chooses from: stored slots followed by the new tokens, per (batch, KV head).

    keys/values [b, h, K, d] (in the engine's decode step values are None, and keys too unless the
    policy `needs_keys`); pos [b, h, K] (-1 = empty or padding); score [b, h, K] the policy's
    stored per-slot score (0 for new tokens; None for unscored policies); attn [b, h, K] summed
    attention probabilities of the observed queries (None when the policy observed none);
    first: the layer held nothing before this forward (the prefill); scaling: the model's softmax scale;
    key_centres [h, d]: what was taken off every key (FP8's centred keys, `rlkv.precision`), or None.
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    pos: torch.Tensor
    score: torch.Tensor | None
    attn: torch.Tensor | None
    first: bool
    scaling: float
    key_centres: torch.Tensor | None = None

    def model_keys(self) -> torch.Tensor:
        """The keys as the model computed them (centres added back): what a policy comparing keys with each other
        reads, so that it chooses the same at every precision. Attention needs no such step (a shift common to
        every key of a head leaves each query's softmax unchanged)."""
        assert self.keys is not None, "the candidates carry keys (the policy's needs_keys)"
        if self.key_centres is None:
            return self.keys
        return (self.keys.float() + self.key_centres[:, None, :].float()).to(self.keys.dtype)


class Policy:
    """Which tokens a token-dropping method keeps. Subclasses set `name`, `scored` and implement `select`."""

    name = "policy"
    scored = False  # stores a float score per slot (Candidates.score)
    needs_keys = False  # select() reads Candidates.keys (else the engine's decode step passes none)

    def __init__(self, budget: int, slack: int = 0):
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"{self.name} needs an integer budget >= 1 (tokens per KV head), got {budget!r}")
        self.budget, self.capacity = budget, budget + slack

    def observed(self, first: bool, q_len: int) -> int:
        """How many of the last queries of this forward must report their attention (Candidates.attn)."""
        return 0

    def select(
        self, state: dict[str, torch.Tensor], c: Candidates, query: torch.Tensor, q_pos: torch.Tensor
    ) -> torch.Tensor:
        """Bool keep mask [b, h, K] with at most `capacity` True per row; scored policies set `c.score` first.
        `state` is the rows' policy state (`empty_state`'s tensors, batch first), updated in place."""
        raise NotImplementedError

    def params(self) -> dict:
        return {"budget": self.budget, "capacity": self.capacity}

    def sequence_bytes(self, layout, num_tokens: torch.Tensor, kv_itemsize: int | None = None) -> torch.Tensor:
        """Bytes a sequence of `num_tokens` holds under this policy, from the model layout alone:
        what `TokenDropCache.sequence_nbytes` measures on a live cache (tested equal), for planning.
        `kv_itemsize`: bytes of a stored K/V element (1: FP8; None: the model's dtype)."""
        itemsize = torch.empty((), dtype=getattr(torch, layout.dtype)).element_size()
        kv = kv_itemsize or itemsize
        per_slot = layout.num_kv_heads * (2 * layout.head_dim * kv + 4 + (4 if self.scored else 0))
        state = self.state_bytes(layout, itemsize)
        return layout.num_layers * (num_tokens.clamp(max=self.capacity) * per_slot + state)

    def state_bytes(self, layout, itemsize: int) -> int:
        """Per layer and sequence, bytes of policy state beyond the slots."""
        return 0

    def empty_state(self, batch: int, q_heads: int, head_dim: int, dtype, device) -> dict[str, torch.Tensor]:
        """The policy state (what `select` keeps in `state`) of `batch` sequences that have seen nothing yet: fixed
        shapes, batch first (state_bytes() per sequence), so the engine can keep it in per-sequence slots."""
        return {}


def top_k_mask(priority: torch.Tensor, k: int, pos: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k highest finite-or-+inf entries per row (-inf never kept); ties keep the older
    token (lower `pos`), so the choice does not depend on the order the candidates come in.

    One `topk` over a key that orders by priority, then by age: of the k kept or of the K - k
    dropped, whichever is fewer (a decode step drops at most one of K)."""
    num = priority.shape[-1]
    finite = priority > float("-inf")
    if k >= num:
        return finite
    key = rank_key(priority, pos)
    drop = num - k
    if drop < k:
        return finite & torch.ones_like(finite).scatter_(-1, key.topk(drop, dim=-1, largest=False).indices, False)
    return finite & torch.zeros_like(finite).scatter_(-1, key.topk(k, dim=-1).indices, True)


def rank_key(priority: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of (priority, then the older token first): float32 priority bits made
    monotone in the high 32 bits, 2^31 - 1 - pos (pos >= -1) in the low 32."""
    bits = (priority.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (monotone << 32) + (2**31 - 1 - pos.to(torch.int64))


def pool_by_position(score: torch.Tensor, pos: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool `score` [b, h, K] over neighbouring token positions (kernel odd); empty slots (pos -1) give 0."""
    if kernel <= 1:
        return score
    order = torch.where(pos < 0, torch.iinfo(pos.dtype).max, pos).argsort(dim=-1)
    sorted_score = score.masked_fill(pos < 0, 0.0).gather(-1, order)
    b, h, k = score.shape
    pooled = F.max_pool1d(sorted_score.reshape(b * h, 1, k), kernel, stride=1, padding=kernel // 2).reshape(b, h, k)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


def last_position(pos: torch.Tensor) -> torch.Tensor:
    """[b, h, 1]: the newest token position among the candidates."""
    return pos.amax(dim=-1, keepdim=True)


def grouped_probs(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q k^T) [b, h_kv, group, q, K] in float32; query [b, hq, q, d], mask [b, h_kv, q, K]; empty rows -> 0."""
    b, hq, q, d = query.shape
    h = keys.shape[1]
    qg = query.float().reshape(b, h, hq // h, q, d)
    scores = torch.matmul(qg, keys.float()[:, :, None].transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def allowed_keys(pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[b, h, q, K]: which candidates at pos [b, h, K] each query at q_pos [b, q] may attend: valid (pos >= 0),
    causal by position, inside the model's sliding window if any."""
    qp = q_pos[:, None, :, None]
    kp = pos[:, :, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= kp > qp - window
    return allowed


def candidate_attention(query, keys, values, pos, q_pos, scaling: float, window: int | None, observe: int):
    """Attention of query [b, hq, q, d] at q_pos [b, q] over candidates keys/values [b, h, K, d] at pos [b, h, K]
    -> (output [b, q, hq, d], attention [b, h, K] the last `observe` queries pay each candidate, summed over
    them and averaged over the GQA group; None if observe is 0). Mask: valid (pos >= 0), causal by
    position, the model's sliding window if any; explicit float32 softmax in chunks of CHUNK queries."""
    b, h, num_keys, _ = keys.shape
    q = query.shape[2]
    mask = allowed_keys(pos, q_pos, window)
    out = query.new_empty(b, q, query.shape[1], values.shape[-1])
    attn = keys.new_zeros(b, h, num_keys, dtype=torch.float32) if observe else None
    for start in range(0, q, CHUNK):
        stop = min(start + CHUNK, q)
        probs = grouped_probs(query[:, :, start:stop], keys, mask[:, :, start:stop], scaling)
        chunk = torch.matmul(probs, values.float()[:, :, None])  # [b, h, g, cq, d]
        out[:, start:stop] = chunk.reshape(b, -1, stop - start, chunk.shape[-1]).transpose(1, 2).to(out.dtype)
        if attn is not None and stop > q - observe:
            attn += probs[:, :, :, max(start, q - observe) - start :].sum(dim=-2).mean(dim=2)
    return out, attn


def slot_attention(query, keys, values, pos, q_pos, scaling: float, window: int | None) -> torch.Tensor:
    """Output [b, 1, hq, d] of one query per row at q_pos [b, 1] over slots keys/values [b, h, n, d] at pos
    [b, h, n] (valid, causal, in the window): one fused attention call, the GQA group along the query axis."""
    b, hq, _, d = query.shape
    h = keys.shape[1]
    allowed = allowed_keys(pos, q_pos, window) | (q_pos < 0)[:, None, :, None]  # padding queries: any output will do
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(query.reshape(b, h, hq // h, d), keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, hq, -1)


def select_tokens(
    query,
    keys,
    values,
    pos,
    score,
    q_pos,
    scaling: float,
    window: int | None,
    policy: Policy,
    state: dict,
    first: bool,
    key_centres: torch.Tensor | None = None,
):
    """Attend the new queries [b, hq, q, d] at q_pos [b, q] over candidates keys/values [b, h, K, d] at pos
    [b, h, K] (score: the policy's stored scores, new tokens 0; key_centres: `Candidates`'), then let `policy`
    choose -> (output [b, q, hq, d], Candidates, keep mask [b, h, K])."""
    observe = min(policy.observed(first, query.shape[2]), query.shape[2])
    out, attn = candidate_attention(query, keys, values, pos, q_pos, scaling, window, observe)
    c = Candidates(keys, values, pos, score, attn, first, scaling, key_centres)
    return out, c, policy.select(state, c, query, q_pos)


def compact(c: Candidates, keep: torch.Tensor, capacity: int):
    """The kept candidates in the first slots, in candidate (= chronological) order, at most `capacity` per row
    -> (keys, values, pos (-1 = empty), score or None)."""
    width = min(keep.shape[-1], capacity)
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    slot_kept = keep.gather(-1, order)
    idx = order[..., None]
    assert c.keys is not None and c.values is not None, "compacting needs the candidates' keys and values"
    keys = c.keys.gather(2, idx.expand(-1, -1, -1, c.keys.shape[-1]))
    values = c.values.gather(2, idx.expand(-1, -1, -1, c.values.shape[-1]))
    pos = torch.where(slot_kept, c.pos.gather(-1, order), -1)
    return keys, values, pos, (c.score.gather(-1, order) if c.score is not None else None)
