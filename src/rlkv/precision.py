"""KV precision: how a store holds K/V (the model's dtype, or FP8 with per-KV-head scales), and which heads hold which.

A `KVPrecision` is a property of a store, not of a method: the engine's pages and rings, the token droppers'
slots and `compress`'s cache each carry one, the kernels read it, and every byte count is computed from
its `itemsize`. FP8 is e4m3 (`torch.float8_e4m3fn`, +-448, 3 mantissa bits), as vLLM's `kv_cache_dtype="fp8"`.

Scaling. Each (layer, KV head) has one scale for K and one for V, fixed for the model: what is stored is
e4m3(clamp(x / scale, -448, 448)) and what attention reads back is that times the scale. The scales are
calibrated once per model (`calibrate`) on one forward of `CALIBRATION_TOKENS` seeded random token ids,
as vLLM's `calculate_kv_scales` computes its scales from a forward (amax / 200 for K, / 100 for V, per
layer), with three differences:
- per KV head, not per layer: heads of one layer can differ widely in range (Qwen's keys carry a bias),
  and a head's own scale keeps its small values out of e4m3's subnormals (vLLM's per-head scales exist
  only through offline calibration with llm-compressor);
- a power of two: amax x `HEADROOM` (2 for K, 4 for V, as vLLM's 448 / 200 and 448 / 100) maps to at most
  448, so K values up to 2 to 4 times the calibration's amax are represented and V values up to 4 to 8
  times (on SmolLM2-135M and Qwen2.5-0.5B, GSM8K prompts reached at most 0.69 and 0.92 of the calibrated
  range at a headroom of 2, V the closer: hence V's 4), and scaling is exact, so the kernels
  dequantise in registers by exact multiplies (the decode kernel folds K's scale into the softmax scale
  and V's into the output) and every runtime reads bit-identical values whatever its compute dtype;
- saturating: a value beyond 448 x scale is stored as +-448 x scale (an overflowing `float8_e4m3fn`
  cast would give NaN), as vLLM's CUDA conversion (`__NV_SATFINITE`) does.

Centred keys. A head's keys can sit on a large offset per channel (Qwen2's key bias: channels near 300
whose tokens differ by a few units), which e4m3's 3 mantissa bits round in steps of 32 there: the scores
q.k move by tens, and a Qwen2.5 fails (users of vLLM-based stacks report Qwen2.5 collapsing at FP8 KV;
RESULTS.md has the 1.5B's GSM8K at 62.1 -> 40.8). So an FP8 head stores k - c, `c` the calibration's mean
key per channel (`centres`): exact for attention, since q.c is the same for every key a query sees and
softmax ignores it. Every runtime subtracts `c` where a new key arrives (`centred`), so everything
downstream, the stores, the kernels and the masked reference, holds and reads centred keys. Values need no
centre: their rounding moved the 1.5B's predictions over a thousand times less than the keys'
(`benchmarks/kv_fidelity.py`). A token dropper that compares keys (R-KV's cosine redundancy) compares
centred keys at FP8.

The scales do not depend on which runtime asks (the engine and `compress` read the same ones), nor on
the prompts served, so results are reproducible across batches and runtimes.

Semantics, for every runtime and the masked reference alike: a key or value is rounded to its head's
precision when it is produced (`round_trip`), before any attention reads it, the token's own included;
stored and read back it stays the same value.

Policies (`KV_DTYPES`), per head, decided beside which heads a `HeadSplit` keeps: "bf16" (the
model's own dtype: bf16 on a GPU, whatever the model runs in), "fp8" (every head), "fp8-kept" (the heads
a head split keeps in FP8, the compressed heads' sink + recent rings in the model's dtype: rings are
small, and the recent tokens they hold matter most).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
HEADROOM = (2.0, 4.0)  # K's and V's: the calibration's amax times this maps to at most FP8_MAX
CALIBRATION_TOKENS = 512
KV_DTYPES = ("bf16", "fp8", "fp8-kept")
KEYS, VALUES = 0, 1


@dataclass(frozen=True)
class KVPrecision:
    """How a store holds K/V: `dtype` (the model's, or FP8), and for FP8 the `scales` [2 (K, V), layers,
    kv_heads] (float32 powers of two) that map a head's values into e4m3's range, and the `centres`
    [layers, kv_heads, head_dim] (float32) its keys are stored less (None: no centring)."""

    dtype: torch.dtype
    scales: torch.Tensor | None = None
    centres: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def itemsize(self) -> int:
        """Bytes of one stored element."""
        return torch.empty((), dtype=self.dtype).element_size()

    def scale(self, which: int, layer: int) -> torch.Tensor:
        """[kv_heads] scales of K (`which` 0) or V (1) of `layer`."""
        assert self.scales is not None, "only a quantized precision has scales"
        return self.scales[which, layer]

    def store(self, x: torch.Tensor, which: int, layer: int, heads, dim: int) -> torch.Tensor:
        """`x` as stored: its KV heads `heads` (indices, or a slice) lie along dimension `dim`."""
        if not self.quantized:
            return x.to(self.dtype)
        scaled = x.float() / _along(self.scale(which, layer)[heads], x.ndim, dim)
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)

    def load(self, x: torch.Tensor, which: int, layer: int, heads, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Stored `x` read back in `dtype` (exact: a scale is a power of two)."""
        if not self.quantized:
            return x.to(dtype)
        return (x.float() * _along(self.scale(which, layer)[heads], x.ndim, dim)).to(dtype)

    def round_trip(self, x: torch.Tensor, which: int, layer: int, heads, dim: int) -> torch.Tensor:
        """What attention reads of `x` once stored (`x` itself at the model's dtype)."""
        if not self.quantized:
            return x
        return self.load(self.store(x, which, layer, heads, dim), which, layer, heads, dim, x.dtype)

    def key_centres(self, layer: int) -> torch.Tensor | None:
        """[kv_heads, head_dim] centres of `layer`'s keys, or None."""
        return None if self.centres is None else self.centres[layer]

    def to(self, device) -> KVPrecision:
        if self.scales is None:
            return self
        return KVPrecision(
            self.dtype, self.scales.to(device), None if self.centres is None else self.centres.to(device)
        )


def _along(scale: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """`scale` [h] shaped to broadcast along dimension `dim` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return scale.view(shape)


def centred(key: torch.Tensor, centres: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """`key` (KV heads along `dim`, channels last) less its heads' `centres` [kv_heads, head_dim], in its dtype;
    `key` itself when there are none. Where a runtime's new keys arrive, before anything stores or reads them."""
    if centres is None:
        return key
    shape = [1] * key.ndim
    shape[dim], shape[-1] = centres.shape
    return (key.float() - centres.view(shape)).to(key.dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor viewed as uint8, for the operations torch lacks for float8 on a CPU (gather, scatter)."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def check_kv_dtype(kv_dtype: str) -> str:
    """`kv_dtype` if it is a KV precision policy, else a one-line error naming them."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


@dataclass(frozen=True)
class KVPrecisions:
    """A policy made concrete for one model: the precision of the heads a head split keeps, and of its rings."""

    kept: KVPrecision
    compressed: KVPrecision

    @property
    def quantized(self) -> bool:
        return self.kept.quantized or self.compressed.quantized

    def round_trip(self, layer: int, kept_heads, compressed_heads, key, value, dim: int) -> tuple:
        """New K and V of `layer`, every KV head along `dim`, as attention reads them once stored: `kept_heads`
        (indices) at `kept`'s precision, `compressed_heads` at `compressed`'s (the same tensors if unquantised)."""
        if not self.quantized:
            return key, value
        out = []
        for which, x in ((KEYS, key), (VALUES, value)):
            x = x.clone()
            for heads, precision in ((kept_heads, self.kept), (compressed_heads, self.compressed)):
                at = (slice(None),) * dim + (heads,)
                x[at] = precision.round_trip(x[at], which, layer, heads, dim)
            out.append(x)
        return tuple(out)

    def key_centres(self, layer: int, kept_heads: torch.Tensor, compressed_heads: torch.Tensor) -> torch.Tensor | None:
        """[kv_heads, head_dim] centres of `layer`'s keys: the kept heads' (indices) from `kept`, the compressed
        heads' from `compressed`, zero at a precision without centres; None if neither has any."""
        kept, compressed = self.kept.key_centres(layer), self.compressed.key_centres(layer)
        like = kept if kept is not None else compressed
        if like is None:
            return None
        out = torch.zeros_like(like)
        for heads, centres in ((kept_heads, kept), (compressed_heads, compressed)):
            if centres is not None:
                out[heads] = centres[heads]
        return out

    def to(self, device) -> KVPrecisions:
        return KVPrecisions(self.kept.to(device), self.compressed.to(device))


def precisions(model, kv_dtype: str) -> KVPrecisions:
    """`kv_dtype`'s precisions for `model` (FP8 scales from `calibrate`, on the model's device)."""
    native = KVPrecision(next(model.parameters()).dtype)
    if check_kv_dtype(kv_dtype) == "bf16":
        return KVPrecisions(native, native)
    fp8 = calibrate(model)
    return KVPrecisions(fp8, native if kv_dtype == "fp8-kept" else fp8)


_CALIBRATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibrate(model) -> KVPrecision:
    """`model`'s FP8 precision (see the module docstring): one forward of `CALIBRATION_TOKENS` random ids (seed 0)
    gives every KV head's mean key per channel (after RoPE: the `centres`) and the amax of its centred K and of
    its V, and each scale is the least power of two with amax x HEADROOM / scale <= FP8_MAX. Computed once per
    model object."""
    if model in _CALIBRATED:
        return _CALIBRATED[model]
    from rlkv.hf.plumbing import base_attention, patched  # transformers: only when a model is calibrated

    config = model.config.get_text_config()
    device = next(model.parameters()).device
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    state = _Observed(
        torch.zeros(2, layers, heads, device=device), [None] * layers, base_attention(model.config._attn_implementation)
    )
    with torch.inference_mode(), patched(model, "rlkv_calibrate", _observe, state):
        model(input_ids=calibration_ids(config).to(device), use_cache=False)
    fp8 = KVPrecision(FP8, scale_for(state.amax), torch.stack(state.centres))
    _CALIBRATED[model] = fp8
    return fp8


def calibration_ids(config) -> torch.Tensor:
    """The token ids [1, length] `calibrate` feeds a model of text `config`: `CALIBRATION_TOKENS` (at most its
    positions) uniform random ids, seed 0, on the CPU."""
    length = min(CALIBRATION_TOKENS, getattr(config, "max_position_embeddings", None) or CALIBRATION_TOKENS)
    return torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


@dataclass
class _Observed:
    """What `calibrate`'s attention function records: per layer and KV head, the amax of the centred K and of V,
    and the mean key per channel."""

    amax: torch.Tensor  # [2 (K, V), layers, kv_heads]
    centres: list  # per layer: [kv_heads, head_dim]
    base: object  # the model's own attention function

    def before_forward(self, step) -> None:
        pass


def _observe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own attention, observing its K and V on the way."""
    from rlkv.hf.plumbing import state_of

    state, layer = state_of(module, "rlkv.precision.calibrate"), module.layer_idx
    keys = key.detach().float()
    centres = keys.mean(dim=(0, 2))  # [kv_heads, head_dim]
    state.centres[layer] = centres
    state.amax[KEYS, layer] = centred(keys, centres).abs().amax(dim=(0, 2, 3))
    state.amax[VALUES, layer] = value.detach().abs().amax(dim=(0, 2, 3)).float()
    return state.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The least power of two `s` with amax x HEADROOM / s <= FP8_MAX (1 where amax is 0); amax [2 (K, V), ...]."""
    headroom = torch.tensor(HEADROOM, dtype=torch.float64, device=amax.device).view(2, *[1] * (amax.ndim - 1))
    need = (amax.double() * headroom / FP8_MAX).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(need))
    return torch.where(amax > 0, torch.exp2(exponent), 1.0).float()
