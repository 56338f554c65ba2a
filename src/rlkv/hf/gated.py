"""Gated attention: every KV head mixes full and streaming attention with a learnable gate.

RLKV learns one gate alpha[l, h] in [0, 1] per KV head (the query heads of a GQA group share
it). Inside `with gated(model, alpha, sink, recent):` each query head's attention output is

    alpha * full_attention + (1 - alpha) * streaming_attention

where streaming attention sees only the first `sink` and the last `recent` keys (the rule of
`rlkv.attention.reference.keep_keys_mask`; with `block` > 1, at the block granularity of the RLKV
authors' block-sparse training attention). Both branches run through PyTorch SDPA: the full
branch is transformers' own sdpa attention with transformers' own mask; the streaming branch
uses one boolean [b, 1, q, k] mask shared by all heads, built once per forward from token
positions (a forward pre-hook reads the 2-D padding mask, as in `rlkv.hf`). Autograd runs
through both branches, so the gradient to alpha is exact. Nothing else is trainable here: the
caller decides what requires grad.

It works with or without a KV cache: under `model.generate` the ordinary `DynamicCache` holds
every token and the streaming branch masks, so rollouts are sampled from the gated policy.
When no key is old enough to fall out of the sink + recent window, both branches are the same
attention and only the full one is computed (alpha then gets no gradient from that forward,
which is its exact value: zero).

The attention function is plugged in by `rlkv.hf.plumbing.patched` (registered through
`AttentionInterface` as "rlkv_gated_<base>"); the model's own implementation is restored on exit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlkv.attention.reference import block_window, gate_mix, keep_keys_mask
from rlkv.hf.plumbing import Step, patched, state_of
from rlkv.models import Layout

# cuDNN attention is left out: on an H100 (torch 2.11, bf16) its backward gave NaN gradients to
# alpha for some sequence lengths (448 and 576 tokens, say); flash, memory-efficient and math agree.
TRAINING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def init_gates(model, value: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    """A (layers x kv_heads) gate Parameter for `model`, every entry `value` (RLKV: 1)."""
    layout = Layout.of(model)
    device = next(model.parameters()).device
    return torch.nn.Parameter(torch.full(layout.shape, float(value), dtype=dtype, device=device))


class _Gates:
    """What the attention function needs during one `gated` block."""

    def __init__(self, alpha: torch.Tensor, group: int, sink: int, recent: int, block: int):
        self.alpha, self.group, self.sink, self.recent, self.block = alpha, group, sink, recent, block
        self.q_pos = self.k_pos = None
        self.masks: dict[int | None, torch.Tensor] = {}

    def before_forward(self, step: Step) -> None:
        self.q_pos, self.k_pos, self.masks = step.q_pos, step.k_pos, {}

    def streaming_mask(self, window: int | None) -> torch.Tensor | None:
        """Bool [b, 1, q, k] for the streaming branch, or None if it would equal full attention."""
        if window not in self.masks:
            if window is None and int(self.q_pos.max()) < sum(block_window(self.sink, self.recent, self.block)):
                self.masks[window] = None  # no key has left the sink + recent window yet
            else:
                full = torch.zeros(1, dtype=torch.bool)
                mask = keep_keys_mask(self.q_pos, self.k_pos, full, self.sink, self.recent, window, block=self.block)
                self.masks[window] = mask | (self.q_pos < 0)[:, None, :, None]  # padding queries: keep finite
        return self.masks[window]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    gates: _Gates = state_of(module, "rlkv.hf.gated")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    with sdpa_kernel(TRAINING_BACKENDS):
        full, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    window = kwargs.get("sliding_window")
    if window is not None and gates.k_pos.shape[1] <= window:
        window = None  # no token is old enough to leave the model's sliding window yet
    mask = gates.streaming_mask(window)
    if mask is None:
        return full, None
    mask = mask[..., -key.shape[2] :]
    with sdpa_kernel(TRAINING_BACKENDS):
        stream = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        ).transpose(1, 2)
    return gate_mix(full, stream, gates.alpha[module.layer_idx], gates.group, head_dim=2), None


def gated(model, alpha: torch.Tensor, sink: int = 128, recent: int = 256, block: int = 1):
    """Run `model` with attention gated per KV head by `alpha` [layers, kv_heads] inside the block.

    `alpha` is used as is (no clamping, no copy): make it a Parameter to train it. `block`: the
    streaming branch's granularity (1: token-exact; the authors train with 128). The model must use
    sdpa or eager attention; its implementation is restored on exit.
    """
    layout = Layout.of(model)
    if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != layout.shape or not alpha.is_floating_point():
        got = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a float tensor of shape {layout.shape} (layers x kv_heads), got {got}")
    for name, value, low in (("sink", sink, 0), ("recent", recent, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    block_window(sink, recent, block)  # checks block
    gates = _Gates(alpha, layout.group_size, sink, recent, block)
    return patched(model, "rlkv_gated", _attention, gates)
