"""rlkv on transformers: runtimes that change how a model's attention and cache work inside a `with` block.

- `compress` (`headsplit`, `splitcache`): RLKV's head split for `generate`: kept heads hold every
  token, compressed heads a sink + recent ring.
- `token_drop` (`tokendrop`): the token-dropping baselines (H2O, SnapKV, R-KV) for `generate`.
- `gated` (`gated`): the trainable per-head mix of full and streaming attention that
  identification learns (`rlkv.identify`).
All three plug in the same way (`plumbing`: a registered attention function, a per-forward
`Step` of token positions, optionally their own cache); the rules they run are in `rlkv.attention`.
"""

from rlkv.hf.gated import gated, init_gates
from rlkv.hf.headsplit import FullCache, cache_nbytes, compress, resolve_keep
from rlkv.hf.splitcache import HeadSplitCache, HeadSplitLayer
from rlkv.hf.tokendrop import TokenDropCache, TokenDropLayer, token_drop

__all__ = [
    "FullCache",
    "HeadSplitCache",
    "HeadSplitLayer",
    "TokenDropCache",
    "TokenDropLayer",
    "cache_nbytes",
    "compress",
    "gated",
    "init_gates",
    "resolve_keep",
    "token_drop",
]
