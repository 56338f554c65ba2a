"""Token-dropping KV caches for transformers `generate`: the runtime shared by H2O, SnapKV and R-KV.

(`rlkv.engine.tokendrop` runs the same `TokenDropLayer.attend` over fixed per-sequence slots.)

Token-dropping baselines keep, per layer and per KV head, a bounded set of tokens chosen by
attention statistics (H2O, Zhang et al. 2023, arXiv:2306.14048; SnapKV, Li et al. 2024,
arXiv:2404.14469; R-KV, Cai et al. 2025, arXiv:2505.24133). They share everything here and
differ only in a `Policy` (`h2o.py`, `snapkv.py`, `rkv.py`): which candidates to keep.

Design, in the order a forward pass meets it:

1. `token_drop(model, policy)` switches the model to the attention function "rlkv_tokendrop_<base>"
   (registered through `AttentionInterface`, with the base implementation's mask builder), makes
   `generate` build a `TokenDropCache` instead of a `DynamicCache`, and hooks the decoder to read
   each new token's position from the 2-D padding mask (padding = -1; left padding does not
   count). Everything is undone when the `with` block exits.
2. `TokenDropLayer.update` only counts tokens: `get_seq_length()` is the LOGICAL length (tokens
   seen), which transformers 5.x takes positions from; the new K/V go on to the attention function.
3. `TokenDropLayer.attend` forms the candidates (stored slots + the new tokens, each with its
   position), attends every query over them with an explicit softmax (chunks of `CHUNK` queries;
   mask: valid, causal by position, the model's sliding window if any), and sums the
   probabilities of the last `policy.observed(...)` queries per key (mean over the GQA group of
   query heads: decisions are per KV head). The policy then returns a keep mask over the
   candidates, and the layer compacts the kept ones (in chronological order) into at most
   `policy.capacity` slots. Eviction therefore happens after each forward: within one forward
   (the prefill) attention is exact causal attention over stored + new tokens.

Storage per layer: keys/values [b, h_kv, width, d], positions [b, h_kv, width] (int32, -1 =
empty) and, for scored policies, a float32 score per slot; width grows with the sequence up to
`capacity` (= budget, plus the compression interval for R-KV). A decoding step (one token per
row) then works in place on `capacity` + 1 slots: the spare one takes the new token, and if the
policy keeps it, it moves into the first empty slot (evicted slots are emptied), so nothing is
concatenated or compacted. `nbytes()` counts the slots in use (min(tokens, capacity) per head,
not the spare) and the policy state; `sequence_nbytes(n)` what one sequence of n tokens occupies.
Without a `TokenDropCache` (use_cache=False, or a cache the caller passed) attention is the base
implementation's: exact, nothing dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from rlkv.attention.plumbing import CompressedLayer, Step, base_attention, patched, state_of

CHUNK = 256  # queries per explicit-softmax block: memory is O(CHUNK x keys) per head


@dataclass
class Candidates:
    """What a policy chooses from: stored slots followed by the new tokens, per (batch, KV head).

    keys/values [b, h, K, d] (in the engine's decode step values are None, and keys too unless the
    policy `needs_keys`); pos [b, h, K] (-1 = empty or padding); score [b, h, K] the policy's
    stored per-slot score (0 for new tokens; None for unscored policies); attn [b, h, K] summed
    attention probabilities of the observed queries (None when the policy observed none);
    first: the layer held nothing before this forward (the prefill); scaling: the model's softmax scale.
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    pos: torch.Tensor
    score: torch.Tensor | None
    attn: torch.Tensor | None
    first: bool
    scaling: float


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

    def select(self, state: dict[str, torch.Tensor], c: Candidates, query: torch.Tensor,
               q_pos: torch.Tensor) -> torch.Tensor:
        """Bool keep mask [b, h, K] with at most `capacity` True per row; scored policies set `c.score` first.
        `state` is the rows' policy state (`empty_state`'s tensors, batch first), updated in place."""
        raise NotImplementedError

    def params(self) -> dict:
        return {"budget": self.budget, "capacity": self.capacity}

    def sequence_bytes(self, layout, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes a sequence of `num_tokens` holds under this policy, from the model layout alone:
        what `TokenDropCache.sequence_nbytes` measures on a live cache (tested equal), for planning."""
        itemsize = torch.empty((), dtype=getattr(torch, layout.dtype)).element_size()
        per_slot = layout.num_kv_heads * (2 * layout.head_dim * itemsize + 4 + (4 if self.scored else 0))
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


def candidate_attention(query, keys, values, pos, q_pos, scaling: float, window: int | None, observe: int):
    """Attention of query [b, hq, q, d] at q_pos [b, q] over candidates keys/values [b, h, K, d] at pos [b, h, K]
    -> (output [b, q, hq, d], attention [b, h, K] the last `observe` queries pay each candidate, summed over
    them and averaged over the GQA group; None if observe is 0). Mask: valid (pos >= 0), causal by
    position, the model's sliding window if any; explicit float32 softmax in chunks of CHUNK queries."""
    b, h, num_keys, _ = keys.shape
    q = query.shape[2]
    qp = q_pos[:, None, :, None]
    kp = pos[:, :, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    out = query.new_empty(b, q, query.shape[1], values.shape[-1])
    attn = keys.new_zeros(b, h, num_keys, dtype=torch.float32) if observe else None
    for start in range(0, q, CHUNK):
        stop = min(start + CHUNK, q)
        probs = grouped_probs(query[:, :, start:stop], keys, mask[:, :, start:stop], scaling)
        chunk = torch.matmul(probs, values.float()[:, :, None])  # [b, h, g, cq, d]
        out[:, start:stop] = chunk.reshape(b, -1, stop - start, chunk.shape[-1]).transpose(1, 2).to(out.dtype)
        if observe and stop > q - observe:
            attn += probs[:, :, :, max(start, q - observe) - start :].sum(dim=-2).mean(dim=2)
    return out, attn


def slot_attention(query, keys, values, pos, q_pos, scaling: float, window: int | None) -> torch.Tensor:
    """Output [b, 1, hq, d] of one query per row at q_pos [b, 1] over slots keys/values [b, h, n, d] at pos
    [b, h, n] (valid, causal, in the window): one fused attention call, the GQA group along the query axis."""
    b, hq, _, d = query.shape
    h = keys.shape[1]
    qp = q_pos[:, None, :, None]
    kp = pos[:, :, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= kp > qp - window
    allowed |= qp < 0  # padding queries: any finite output will do
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(query.reshape(b, h, hq // h, d), keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, hq, -1)


class TokenDropLayer(CompressedLayer, CacheLayerMixin):
    """One layer's cache: at most `policy.capacity` (token, position[, score]) slots per KV head."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.cumulative_length = 0
        self.pos = self.score = None
        self.extra: dict[str, torch.Tensor] = {}  # policy state that must follow the batch (R-KV's query window)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def update(self, key_states, value_states, *args, **kwargs):
        """Count the new tokens; they are stored (or dropped) by `attend`, after attention."""
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return key_states, value_states

    def attend(self, query, key, value, q_pos, scaling: float, window: int | None, policy: Policy) -> torch.Tensor:
        """Attention [b, q, hq, d] of the new queries over stored + new tokens; then keep what `policy` selects."""
        b, h, q, _ = key.shape
        if q == 1 and self.is_initialized:
            return self._decode(query, key, value, q_pos, scaling, window, policy)
        new_pos = q_pos.to(torch.int32)[:, None, :].expand(b, h, q)
        first = not self.is_initialized
        if first:
            keys, values, pos = key, value, new_pos
            score = key.new_zeros(b, h, q, dtype=torch.float32) if policy.scored else None
        else:
            keys = torch.cat([self.keys, key], dim=-2)
            values = torch.cat([self.values, value], dim=-2)
            pos = torch.cat([self.pos, new_pos], dim=-1)
            score = torch.cat([self.score, self.score.new_zeros(b, h, q)], dim=-1) if policy.scored else None
        observe = min(policy.observed(first, q), q)
        out, attn = candidate_attention(query, keys, values, pos, q_pos, scaling, window, observe)
        c = Candidates(keys, values, pos, score, attn, first, scaling)
        keep = policy.select(self.extra, c, query, q_pos)
        self._compact(c, keep, policy.capacity)
        return out

    def _decode(self, query, key, value, q_pos, scaling: float, window: int | None, policy: Policy) -> torch.Tensor:
        """One new token per row, in place: the slots (`capacity` + a spare one, which takes the new token) are
        the candidates; then evicted slots are emptied and a kept new token moves into the first empty slot."""
        cap = policy.capacity
        if self.pos.shape[-1] != cap + 1:
            self._to_slots(cap + 1)
        self.keys[:, :, cap] = key[:, :, 0]
        self.values[:, :, cap] = value[:, :, 0]
        self.pos[:, :, cap] = q_pos.to(torch.int32)
        if self.score is not None:
            self.score[:, :, cap] = 0.0
        observe = policy.observed(False, 1)
        if observe:
            out, attn = candidate_attention(query, self.keys, self.values, self.pos, q_pos, scaling, window, observe)
        else:
            out, attn = slot_attention(query, self.keys, self.values, self.pos, q_pos, scaling, window), None
        c = Candidates(self.keys, self.values, self.pos, self.score, attn, False, scaling)
        keep = policy.select(self.extra, c, query, q_pos)
        pos = torch.where(keep, self.pos, -1)
        free = (pos[..., :cap] < 0).to(torch.int8).argmax(dim=-1, keepdim=True)  # [b, h, 1]; one exists if the new token is kept
        source = torch.where(keep[..., cap:], cap, free)  # the slot `free` takes: the new token if kept, else itself
        for t in (self.keys, self.values):
            t.scatter_(2, free[..., None].expand(-1, -1, -1, t.shape[-1]),
                       t.gather(2, source[..., None].expand(-1, -1, -1, t.shape[-1])))
        self.pos = pos.scatter(-1, free, pos.gather(-1, source))
        self.pos[..., cap] = -1
        if c.score is not None:
            score = torch.where(keep, c.score, 0.0)
            self.score = score.scatter(-1, free, score.gather(-1, source))
        return out

    def _to_slots(self, width: int) -> None:
        """Widen the storage to `width` slots (the new ones empty, position -1)."""
        extra = width - self.pos.shape[-1]
        self.keys = F.pad(self.keys, (0, 0, 0, extra))
        self.values = F.pad(self.values, (0, 0, 0, extra))
        self.pos = F.pad(self.pos, (0, extra), value=-1)
        if self.score is not None:
            self.score = F.pad(self.score, (0, extra))

    def _compact(self, c: Candidates, keep: torch.Tensor, capacity: int) -> None:
        """Store the kept candidates in the first slots, in candidate (= chronological) order."""
        width = min(keep.shape[-1], capacity)
        order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
        slot_kept = keep.gather(-1, order)
        idx = order[..., None]
        self.keys = c.keys.gather(2, idx.expand(-1, -1, -1, c.keys.shape[-1]))
        self.values = c.values.gather(2, idx.expand(-1, -1, -1, c.values.shape[-1]))
        self.pos = torch.where(slot_kept, c.pos.gather(-1, order), -1)
        self.score = c.score.gather(-1, order) if c.score is not None else None
        self.is_initialized = True

    # ------------------------------------------------------------------ bookkeeping
    def stored(self) -> torch.Tensor:
        """[b, h]: tokens held per KV head."""
        return (self.pos >= 0).sum(dim=-1)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.pos, self.score, *self.extra.values()) if t is not None]

    def nbytes(self, capacity: int | None = None) -> int:
        """Bytes held: min(tokens fed, capacity) slots per KV head and row, and the policy state (the decoding
        steps' spare slot, scratch for the new token, is not counted)."""
        if not self.is_initialized:
            return 0
        width = self.pos.shape[-1] if capacity is None else min(self.cumulative_length, capacity)
        rows = self.pos.shape[0]
        return int(rows * self.sequence_nbytes(torch.tensor(width), width))

    def sequence_nbytes(self, num_tokens: torch.Tensor, capacity: int) -> torch.Tensor:
        """Bytes one sequence of `num_tokens` occupies: min(num_tokens, capacity) slots plus its policy state."""
        if not self.is_initialized:
            return torch.zeros_like(num_tokens)
        per_slot = sum(t[0, :, 0].numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.score) if t is not None)
        state = sum(t[0].numel() * t.element_size() for t in self.extra.values())
        return num_tokens.clamp(max=capacity) * per_slot + state

    def _map(self, fn) -> None:
        for name in ("keys", "values", "pos", "score"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.extra = {k: fn(t) for k, t in self.extra.items()}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TokenDropCache cannot be cropped: evicted tokens are gone (no assisted decoding)")

    def reset(self) -> None:
        raise NotImplementedError("TokenDropCache cannot be reset; create a new one per generation")


class TokenDropCache(Cache):
    """A transformers Cache holding at most `policy.capacity` tokens per layer and KV head."""

    def __init__(self, policy: Policy, num_layers: int):
        super().__init__(layers=[TokenDropLayer() for _ in range(num_layers)])
        self.policy = policy

    def nbytes(self) -> int:
        """Bytes this cache holds right now (K/V, positions, scores, policy state; see `TokenDropLayer.nbytes`)."""
        return sum(layer.nbytes(self.policy.capacity) for layer in self.layers)

    def sequence_nbytes(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Bytes each sequence needs for its own `num_tokens` [batch] (padding of other rows excluded)."""
        return sum(layer.sequence_nbytes(num_tokens, self.policy.capacity) for layer in self.layers)


@dataclass
class TokenDrop:
    """A token-dropping method for the registry: `apply(model)` generates with `policy`'s cache."""

    policy: Policy
    name: str
    sparsity: float = 0.0
    params: dict = field(default_factory=dict)

    def apply(self, model):
        return token_drop(model, self.policy)

    def describe(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, **self.policy.params(), **self.params}


HARNESS_OPTIONS = ("heads", "sink", "recent", "seed")  # passed to every builder by rlkv.eval; token dropping ignores them


def check_build(name: str, budget, options: dict) -> int:
    """The budget of a builder call; refuses a missing budget and kwargs that are neither the method's nor the harness's."""
    unknown = sorted(set(options) - set(HARNESS_OPTIONS))
    if unknown:
        raise ValueError(f"method {name!r} got unknown options {unknown}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"method {name!r} needs budget= an integer >= 1 (tokens kept per layer and KV head; on the "
                         f"command line --budget N, or --match-bytes in rlkv eval), got {budget!r}")
    return budget


class _Session:
    """Per `token_drop` block: the latest forward's cache and new-token positions."""

    def __init__(self, policy: Policy, base: str):
        self.policy, self.base = policy, base_attention(base)
        self.cache: Cache | None = None
        self.q_pos: torch.Tensor | None = None

    def before_forward(self, step: Step) -> None:
        self.q_pos, self.cache = step.q_pos, step.cache


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session: _Session = state_of(module, "rlkv token-drop")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not isinstance(session.cache, TokenDropCache):
        return session.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = session.cache.layers[module.layer_idx]
    out = layer.attend(query, key, value, session.q_pos, scaling, kwargs.get("sliding_window"), session.policy)
    return out, None


def token_drop(model, policy: Policy):
    """Inside the block, `model.generate` uses a `TokenDropCache` run by `policy`; yields a handle with `.cache`."""
    session = _Session(policy, model.config._attn_implementation)
    num_layers = model.config.get_text_config().num_hidden_layers
    return patched(model, "rlkv_tokendrop", _attention, session, make_cache=lambda: TokenDropCache(policy, num_layers))
