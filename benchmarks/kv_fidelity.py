"""How far a KV precision moves a model's predictions, teacher-forced on its own answers (no GPU needed).

The model reads each of its full-cache answers (a run directory's samples.jsonl: the prompt rebuilt from the
task, the completion as written) once per precision, every key and value rounded as that precision stores it,
and at every answer position its next-token distribution is set against the unquantised model's: top-1
agreement and mean KL(unquantised || quantised). One forward per answer and precision, every position at once
and nothing sampled, so the rows differ only by the rounding. Precisions:
- fp8: rlkv's (`rlkv.precision.calibrate`: keys less their per-channel centres, a power-of-two scale per
  KV head for K and for V);
- fp8-uncentred: per-head scales computed on the raw keys, no centres (what the calibration did before the
  centres, and what per-tensor or per-head FP8 scales do in other engines);
- fp8-channels: a power-of-two scale per key channel (and per head for values), no centres;
- fp8-values: values at FP8, keys as they are (how much of the damage is the keys').
Beside them, per layer, how far the keys' channels sit off zero: the largest channel amax over the median one
(over the answers, unquantised), the offset centring removes.

    python benchmarks/kv_fidelity.py --model qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf --task gsm8k \
        --samples results/eval_qwen15_kv_bf16/samples.jsonl --limit 6 --out results/kv_fidelity_qwen15.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from common import load_model, print_table, write_result

import rlkv.tasks
from rlkv.hf.plumbing import base_attention, patched, state_of
from rlkv.precision import (
    FP8,
    FP8_MAX,
    KEYS,
    VALUES,
    KVPrecision,
    calibrate,
    calibration_ids,
    centred,
    scale_for,
)

VARIANTS = ("fp8", "fp8-uncentred", "fp8-channels", "fp8-values")
Rounding = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (layer, K, V) -> K, V


@dataclass
class Patch:
    """What the patched attention does to every layer's K and V: `rounding` (None: nothing), and with `observe`
    it records each layer's per-channel key amax [kv_heads, head_dim]."""

    base: object
    rounding: Rounding | None = None
    observe: bool = False
    key_amax: dict = field(default_factory=dict)

    def before_forward(self, step) -> None:
        pass


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state: Patch = state_of(module, "kv_fidelity")
    layer = module.layer_idx
    if state.observe:
        amax = key.detach().float().abs().amax(dim=(0, 2))
        state.key_amax[layer] = torch.maximum(state.key_amax.get(layer, amax), amax)
    if state.rounding is not None:
        key, value = state.rounding(layer, key, value)
    return state.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def calibration_cache(model):
    """The DynamicCache of `calibrate`'s forward (the same random ids): raw K and V per layer."""
    ids = calibration_ids(model.config.get_text_config())
    with torch.inference_mode():
        return model(input_ids=ids.to(model.device), use_cache=True).past_key_values


def roundings(model) -> dict[str, Rounding]:
    """Every variant's rounding of one layer's K and V [b, kv_heads, t, d]."""
    fp8 = calibrate(model)
    cache = calibration_cache(model)
    raw_amax = torch.stack(
        [
            torch.stack([getattr(layer, n).float().abs().amax(dim=(0, 2, 3)) for layer in cache.layers])
            for n in ("keys", "values")
        ]
    )
    uncentred = KVPrecision(FP8, scale_for(raw_amax))
    # [kv_heads, head_dim] per layer: `scale_for`'s rule (K's headroom) per key channel
    channel_amax = torch.stack([layer.keys.float().abs().amax(dim=(0, 2)) for layer in cache.layers])
    channel_scales = scale_for(torch.stack([channel_amax, channel_amax]))[KEYS]

    def per_channel(layer: int, key: torch.Tensor) -> torch.Tensor:
        s = channel_scales[layer][None, :, None, :]
        return ((key.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s).to(key.dtype)

    def both(p: KVPrecision) -> Rounding:
        return lambda layer, k, v: (
            p.round_trip(centred(k, p.key_centres(layer)), KEYS, layer, slice(None), 1),
            p.round_trip(v, VALUES, layer, slice(None), 1),
        )

    return {
        "fp8": both(fp8),
        "fp8-uncentred": both(uncentred),
        "fp8-channels": lambda layer, k, v: (
            per_channel(layer, k),
            uncentred.round_trip(v, VALUES, layer, slice(None), 1),
        ),
        "fp8-values": lambda layer, k, v: (k, fp8.round_trip(v, VALUES, layer, slice(None), 1)),
    }


def answers(tokenizer, samples: str, task_name: str, limit: int, data_dir) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of the first `limit` full-cache answers of `task_name` in `samples`."""
    task = rlkv.tasks.get(task_name)
    examples = {e.id: e for e in task.load(data_dir=data_dir)}
    rows = [json.loads(line) for line in open(samples)]
    rows = [r for r in rows if r["task"] == task_name and r["method"] == "full"][:limit]
    if not rows:
        raise SystemExit(f"{samples} holds no full-cache answers of {task_name}")
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return [(encode(task.prompt(examples[r["id"]], tokenizer)), encode(r["completion"])) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", required=True, help="a run directory's samples.jsonl (its full-cache answers)")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/kv_fidelity.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    model, tokenizer = load_model(args.model)
    sequences = answers(tokenizer, args.samples, args.task, args.limit, args.data_dir)
    rounding = roundings(model)
    state = Patch(base_attention(model.config._attn_implementation))

    def logits(prompt: list[int], completion: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + completion], device=model.device)
        with torch.inference_mode(), patched(model, "kv_fidelity", _attention, state):
            out = model(input_ids=ids, use_cache=False).logits[0]
        return out[len(prompt) - 1 : len(prompt) + len(completion) - 1].float()

    state.observe = True
    reference = [logits(p, c) for p, c in sequences]
    state.observe = False
    offsets = []
    for layer, amax in sorted(state.key_amax.items()):
        spread = amax.amax(dim=-1) / amax.median(dim=-1).values  # per head: largest channel over the median one
        offsets.append(
            {"layer": layer, "key_channel_amax_max": amax.max().item(), "max_over_median": spread.max().item()}
        )
    rows = []
    for name in variants:
        state.rounding = rounding[name]
        agree, kl, tokens = 0, 0.0, 0
        for (prompt, completion), ref in zip(sequences, reference):
            out = logits(prompt, completion)
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            kl += F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
            tokens += len(completion)
        rows.append({"precision": name, "top1_agreement": agree / tokens, "mean_kl": kl / tokens, "tokens": tokens})
        print_table(rows[-1:], ["precision", "top1_agreement", "mean_kl", "tokens"])
    write_result(
        args.out,
        {
            "model": args.model,
            "samples": args.samples,
            "task": args.task,
            "answers": len(sequences),
            "rows": rows,
            "key_offsets": offsets,
        },  # fmt: skip
    )


if __name__ == "__main__":
    main()
