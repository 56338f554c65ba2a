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
- fp8-values: values at FP8, keys as they are (how much of the damage is the keys').

    python benchmarks/kv_fidelity.py --model qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf --task gsm8k \
        --samples results/eval_qwen15_kv_bf16/samples.jsonl --limit 6 --out results/kv_fidelity_qwen15.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import load_model, print_table, write_result

import rlkv.tasks
from rlkv.hf.plumbing import base_attention, patched, state_of
from rlkv.precision import (
    CALIBRATION_TOKENS,
    FP8,
    KEYS,
    VALUES,
    KVPrecision,
    calibrate,
    centred,
    scale_for,
)

VARIANTS = ("fp8", "fp8-uncentred", "fp8-values")


@dataclass
class Rounding:
    """What the patched attention applies: `precision` to the keys (if `keys`) and values of every layer."""

    precision: KVPrecision | None
    keys: bool
    base: object

    def before_forward(self, step) -> None:
        pass


def _rounded_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state: Rounding = state_of(module, "kv_fidelity")
    p, layer = state.precision, module.layer_idx
    if p is not None:
        if state.keys:
            key = p.round_trip(centred(key, p.key_centres(layer)), KEYS, layer, slice(None), 1)
        value = p.round_trip(value, VALUES, layer, slice(None), 1)
    return state.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def uncentred(model) -> KVPrecision:
    """FP8 scales per KV head from the raw keys and values of `calibrate`'s forward (the same random ids), no
    centres."""
    config = model.config.get_text_config()
    ids = torch.randint(0, config.vocab_size, (1, CALIBRATION_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model(input_ids=ids.to(model.device), use_cache=True).past_key_values
    amax = torch.stack(
        [
            torch.stack([getattr(layer, name).abs().amax(dim=(0, 2, 3)) for layer in cache.layers])
            for name in ("keys", "values")
        ]
    )
    return KVPrecision(FP8, scale_for(amax.float()))


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
    precisions = {"fp8": (calibrate(model), True), "fp8-uncentred": (uncentred(model), True)}
    precisions["fp8-values"] = (precisions["fp8"][0], False)
    state = Rounding(None, True, base_attention(model.config._attn_implementation))

    def logits(prompt: list[int], completion: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + completion], device=model.device)
        with torch.inference_mode(), patched(model, "kv_fidelity", _rounded_attention, state):
            out = model(input_ids=ids, use_cache=False).logits[0]
        return out[len(prompt) - 1 : len(prompt) + len(completion) - 1].float()

    reference = [logits(p, c) for p, c in sequences]
    rows = []
    for name in variants:
        state.precision, state.keys = precisions[name]
        agree, kl, tokens = 0, 0.0, 0
        for (prompt, completion), ref in zip(sequences, reference):
            out = logits(prompt, completion)
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            kl += F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
            tokens += len(completion)
        rows.append({"precision": name, "top1_agreement": agree / tokens, "mean_kl": kl / tokens, "tokens": tokens})
        print_table(rows[-1:], ["precision", "top1_agreement", "mean_kl", "tokens"])
    state.precision = None
    write_result(
        args.out,
        {"model": args.model, "samples": args.samples, "task": args.task, "answers": len(sequences), "rows": rows},
    )


if __name__ == "__main__":
    main()
