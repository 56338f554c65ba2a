"""Head split: kept KV heads hold every token, the others only the first `sink` and last `recent`.

The decision is a (layers x kv_heads) keep-mask. Where it comes from is what tells the
methods apart:
- full: every head kept (sparsity is ignored: no compression);
- streaming (StreamingLLM, Xiao et al. 2023): no head kept, every head is sink + recent;
- rlkv / duo: the top (1 - sparsity) heads by a HeadScores file (RLKV gates, DuoAttention weights);
- random: the same count of heads, chosen by seeded random scores (the floor to beat).
`keep_rule` picks how scores become heads ("rank" or "authors", see `rlkv.heads`; None: the
file's own); give every head-ranked method of a comparison the same rule, so they keep as many heads.
`kv_dtype` is the precision policy beside the keep-mask (`rlkv.precision`): "bf16" (the model's dtype),
"fp8" (every head), "fp8-kept" (kept heads in FP8, the compressed heads' rings in the model's dtype).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlkv import patterns
from rlkv.heads import HeadScores
from rlkv.hf.headsplit import compress
from rlkv.hf.splitcache import PREFILL_MODES
from rlkv.models import Layout
from rlkv.precision import check_kv_dtype


@dataclass
class HeadSplit:
    """A head-split compression: `keep` [layers, kv_heads] heads store all tokens."""

    keep: torch.Tensor
    sink: int = 16
    recent: int = 64
    name: str = "headsplit"
    sparsity: float = 0.0
    params: dict = field(default_factory=dict)
    prefill: str = "full"  # the authors' rule (every head attends over the whole prompt), or "compressed"
    kv_dtype: str | None = None  # which heads hold K/V at which precision (rlkv.precision); None: the runtime's, bf16

    def __post_init__(self):
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {self.prefill!r}")
        if self.kv_dtype is not None:
            check_kv_dtype(self.kv_dtype)

    @classmethod
    def from_scores(
        cls,
        heads: HeadScores | str | Path,
        sparsity: float,
        sink: int = 16,
        recent: int = 64,
        keep_rule: str | None = None,
        prefill: str = "full",
    ) -> HeadSplit:
        heads = heads if isinstance(heads, HeadScores) else HeadScores.load(heads)
        rule = keep_rule or heads.keep_rule
        return cls(
            heads.keep_mask(sparsity, rule=rule),
            sink,
            recent,
            name=heads.method,
            sparsity=sparsity,
            params={"keep_rule": rule},
            prefill=prefill,
        )

    def apply(self, model):
        """Context manager: the model generates with this method's per-head cache."""
        return compress(
            model, self.keep, sink=self.sink, recent=self.recent, prefill=self.prefill, kv_dtype=self.kv_dtype or "bf16"
        )

    def describe(self) -> dict:
        return {
            "method": self.name,
            "sparsity": self.sparsity,
            "sink": self.sink,
            "recent": self.recent,
            "prefill": self.prefill,
            "kv_dtype": self.kv_dtype or "bf16",
            "kept_heads": int(self.keep.sum()),
            "heads": int(self.keep.numel()),
            **self.params,
        }


def build_headsplit(
    name: str,
    layout: Layout,
    sparsity: float,
    heads: HeadScores | str | Path | None = None,
    sink: int = 16,
    recent: int = 64,
    seed: int = 0,
    budget: int | None = None,
    keep_rule: str | None = None,
    prefill: str = "full",
) -> HeadSplit:
    """`budget` belongs to the token-dropping methods; head split is sized by sparsity, sink, recent."""
    params: dict = {}
    if name == "full":
        keep, sparsity = torch.ones(layout.shape, dtype=torch.bool), 0.0
    elif name == "streaming":
        keep, sparsity = torch.zeros(layout.shape, dtype=torch.bool), 1.0
    elif name == "random":
        rule = keep_rule or "rank"
        keep = HeadScores.random(layout, seed=seed).keep_mask(sparsity, rule=rule)
        params.update(seed=seed, keep_rule=rule)
    else:
        if heads is None:
            raise ValueError(f"method {name!r} needs a head scores file (--heads)")
        if not isinstance(heads, HeadScores):
            path, heads = patterns.locate(heads), HeadScores.load(heads)
            params["heads_file"] = str(path)
            params["heads_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        heads.check_layout(layout)
        params["keep_rule"] = keep_rule or heads.keep_rule
        keep = heads.keep_mask(sparsity, rule=params["keep_rule"])
    return HeadSplit(keep, sink, recent, name=name, sparsity=float(sparsity), params=params, prefill=prefill)
