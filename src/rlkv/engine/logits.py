"""What a request asks of its next token's logits beyond temperature, top-k and top-p: penalties, a minimum
length, and the most likely tokens' log-probs.

A batch where no request asks any of it samples on the runner's fast paths (inside its CUDA graphs); one
where some request does hands its logits [B, V] here (`pick`), with the requests, in vLLM's order:
1. log-probs of the raw logits (vLLM's default `raw_logprobs`: before penalties and temperature), from
   one log-sum-exp per row; the sampled token's is gathered after sampling, the top-k's come from one
   `topk` of the same logits;
2. `min_tokens`: EOS and the stop ids are kept out while fewer tokens were generated;
3. `repetition_penalty` over the prompt's and the output's tokens, then `frequency_penalty` and
   `presence_penalty` over the output's (OpenAI's definitions);
4. sampling (`rlkv.engine.sampling.sample`: the same seeded noise as the fast paths, so a request asking
   only for top log-probs samples exactly the tokens it would have without).
The host knows every token of a request but the newest one in flight, which is the decode step's input
(`feed`, on the device): a request with `sampled` > len(tokens) counts it from there.
"""

from __future__ import annotations

from collections import Counter

import torch

from rlkv.engine.kv import upload
from rlkv.engine.request import Request
from rlkv.engine.sampling import TOP_K_CANDIDATES, sample, selects

Top = tuple[torch.Tensor, torch.Tensor] | None  # the top log-probs' (ids, log-probs) [B, k], or None if none asked
Picked = tuple[torch.Tensor, torch.Tensor, Top]  # next tokens [B], their log-probs [B], the top log-probs


def needs_logits(req: Request) -> bool:
    """Whether its next token needs this module: a penalty, a minimum length not reached, or top log-probs."""
    p = req.params
    return p.penalized or p.top_logprobs > 0 or req.sampled < p.min_tokens


def pick(
    logits: torch.Tensor,
    requests: list[Request],
    feed: torch.Tensor | None,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> Picked:
    """Next tokens [B] of `requests` from their logits [B, V], their log-probs, and the top log-probs
    (ids, log-probs) [B, k] for the largest k any of them asks for (None if none does). `keys`: the sampling
    noise's `vocab_keys`, made here when not given."""
    raw = logits.float()
    scored = _penalized(_min_length(raw, requests), requests, feed)
    sampled = [r.params for r in requests if not r.params.greedy]
    filtered = any(p.filtered for p in sampled)
    candidates = TOP_K_CANDIDATES if filtered and selects(p.top_k for p in sampled) else None
    tokens = sample(scored, temperature, top_k, top_p, seeds, steps, filtered, keys, candidates)
    return tokens, *score(raw, tokens, max(r.params.top_logprobs for r in requests))


def score(logits: torch.Tensor, tokens: torch.Tensor, k: int | None) -> tuple[torch.Tensor, Top]:
    """The log-probs [B] of `tokens` under `logits` [B, V] (raw: the token's logit less the log-sum-exp), and
    the top `k` (ids, log-probs) [B, k], or None if k is 0 or None."""
    raw = logits.float()
    total = raw.logsumexp(-1)
    logprobs = raw.gather(1, tokens[:, None])[:, 0] - total
    if not k:
        return logprobs, None
    values, ids = raw.topk(k, dim=-1)
    return logprobs, (ids, values - total[:, None])


def _min_length(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """`logits` with each request's EOS and stop ids at -inf while it has generated fewer than `min_tokens`."""
    rows = [(i, t) for i, r in enumerate(requests) if r.sampled < r.params.min_tokens for t in r.eos]
    if not rows:
        return logits
    index = upload(list(zip(*rows)), torch.long, logits.device)
    return logits.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=logits.device))


def _penalized(logits: torch.Tensor, requests: list[Request], feed: torch.Tensor | None) -> torch.Tensor:
    """`logits` with the repetition, frequency and presence penalties of the requests that set them."""
    rows = [i for i, r in enumerate(requests) if r.params.penalized]
    if not rows:
        return logits
    device = logits.device
    seen, counted = [], []  # (row, token): in the prompt or output / once per output occurrence, with its count
    for row, i in enumerate(rows):
        req = requests[i]
        counts = Counter(req.tokens)
        seen += [(row, t) for t in set(req.prompt).union(counts)]
        counted += [(row, t, c) for t, c in counts.items()]
    sub = logits[upload(rows, torch.long, device)]
    is_seen = torch.zeros_like(sub, dtype=torch.bool)
    counts = torch.zeros_like(sub)
    if seen:
        at = upload(list(zip(*seen)), torch.long, device)
        is_seen[at[0], at[1]] = True
    if counted:
        at = upload([[r for r, _, _ in counted], [t for _, t, _ in counted]], torch.long, device)
        counts.index_put_((at[0], at[1]), upload([c for *_, c in counted], torch.float32, device), accumulate=True)
    pending = [row for row, i in enumerate(rows) if requests[i].sampled > len(requests[i].tokens)]
    if pending:  # the newest token is the decode step's input, not on the host yet
        assert feed is not None, "only a decode step has tokens in flight, and it passes its input"
        at = upload(pending, torch.long, device)
        newest = feed[upload([rows[row] for row in pending], torch.long, device)]
        is_seen[at, newest] = True
        counts.index_put_((at, newest), torch.ones(len(pending), device=device), accumulate=True)
    params = [requests[i].params for i in rows]
    penalty = upload(
        [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params], torch.float32, device
    )
    repetition, frequency, presence = penalty.T[:, :, None]
    sub = torch.where(is_seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub = sub - frequency * counts - presence * (counts > 0)
    return logits.index_copy(0, upload(rows, torch.long, device), sub)
