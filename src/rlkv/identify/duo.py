"""DuoAttention-style head identification (Xiao et al. 2024), our implementation, as a baseline.

The same gates as RLKV (`gated`: alpha * full + (1 - alpha) * sink/recent attention per KV
head), trained not by reward but by distillation on retrieval: on synthetic multi-passkey
documents built from any text, the gated model's last hidden states over the answer (the pass
keys recalled at the end) should match the full model's. Loss = MSE on those positions +
`l1` * mean(|alpha|); AdamW, alpha clamped to [0, 1] after each step. Heads that retrieval needs
keep high gates: the premise RLKV argues is the wrong one for reasoning, hence the comparison.

A document: haystack text (the given text, repeated as needed) with `num_keys` sentences "The
pass key number i is NNNNN." inserted at random depths, then a question and the answer listing
every key. Training uses sink 128 + recent 256 by default (the paper's training window), so
documents must be longer than that for the streaming branch to differ from full attention.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlkv.heads import HeadScores, command_line
from rlkv.hf.gated import gated, init_gates
from rlkv.models import Layout


@dataclass
class DuoConfig:
    sink: int = 128
    recent: int = 256
    steps: int = 200
    lr: float = 2e-2
    l1: float = 0.05  # weight of mean(|alpha|) next to the distillation MSE
    length: int = 2048  # haystack tokens per document
    num_keys: int = 8
    batch: int = 1
    seed: int = 0

    def __post_init__(self):
        for name, ok in (
            ("steps", self.steps >= 1),
            ("lr", self.lr > 0),
            ("l1", self.l1 >= 0),
            ("length", self.length >= 1),
            ("num_keys", self.num_keys >= 1),
            ("batch", self.batch >= 1),
        ):
            if not ok:
                raise ValueError(f"DuoConfig.{name} has an invalid value: {getattr(self, name)!r}")


def passkey_document(tokenizer, text: str, length: int, num_keys: int, rng: random.Random) -> tuple[list[int], int]:
    """Token ids of one document and the number of answer tokens at its end."""
    hay = tokenizer(text, add_special_tokens=False).input_ids
    if not hay:
        raise ValueError("the haystack text is empty: pass some text to build passkey documents from")
    hay = (hay * (length // len(hay) + 1))[:length]
    keys = [f"{rng.randrange(10000, 100000)}" for _ in range(num_keys)]
    depths = sorted(rng.randrange(length + 1) for _ in range(num_keys))
    ids, last = [], 0
    for i, (key, depth) in enumerate(zip(keys, depths)):
        ids += (
            hay[last:depth] + tokenizer(f" The pass key number {i + 1} is {key}. ", add_special_tokens=False).input_ids
        )
        last = depth
    ids += hay[last:] + tokenizer(" What are the pass keys, in order?", add_special_tokens=False).input_ids
    answer = tokenizer(" The pass keys are " + ", ".join(keys) + ".", add_special_tokens=False).input_ids
    return ids + answer, len(answer)


def identify_duo(
    model, tokenizer, text: str, config: DuoConfig | None = None, out_dir: str | Path = "duo"
) -> HeadScores:
    """Train DuoAttention-style gates on passkey documents made from `text`; writes out_dir/heads.json."""
    config = config or DuoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = Layout.of(model)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    alpha = init_gates(model)
    opt = torch.optim.AdamW([alpha], lr=config.lr, weight_decay=0.0)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    log = (out_dir / "log.jsonl").open("w")
    try:
        for step in tqdm(range(config.steps), desc="duo", dynamic_ncols=True):
            docs = [passkey_document(tokenizer, text, config.length, config.num_keys, rng) for _ in range(config.batch)]
            width = max(len(d) for d, _ in docs)  # left padding keeps every answer at the end
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([[pad] * (width - len(d)) + d for d, _ in docs], device=alpha.device)
            mask = torch.tensor([[0] * (width - len(d)) + [1] * len(d) for d, _ in docs], device=alpha.device)
            n_answer = min(n for _, n in docs)
            with torch.no_grad():
                target = (
                    model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, -n_answer:].float()
                )
            with gated(model, alpha, config.sink, config.recent):
                hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, -n_answer:]
            hidden = hidden.float()
            mse = torch.nn.functional.mse_loss(hidden, target)
            loss = mse + config.l1 * alpha.abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            record = {
                "step": step + 1,
                "mse": mse.item(),
                "loss": loss.item(),
                "alpha_mean": alpha.mean().item(),
                "alpha_below_half": (alpha < 0.5).float().mean().item(),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
    finally:
        log.close()
        for p in frozen:
            p.requires_grad_(True)
    heads = HeadScores(
        alpha.detach(),
        model=layout.name,
        layout=layout.to_dict(),
        method="duo",
        provenance={"config": asdict(config), "steps": config.steps, "command": command_line()},
    )
    heads.save(out_dir / "heads.json")
    return heads
