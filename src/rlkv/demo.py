"""`rlkv demo`: what RLKV's heads buy, on Qwen2.5-Coder-0.5B-Instruct and a 2-core CPU.

GSM8K problems are answered greedily (step by step, the answer in \\boxed{}) with a full KV cache,
then with half the KV heads compressed (sparsity 0.5) four ways at equal memory: the RLKV heads
shipped with rlkv (`rlkv:qwen2.5-coder-0.5b-instruct`, learned by `rlkv identify`: GRPO on
per-head gates), DuoAttention heads (`duo:qwen2.5-coder-0.5b-instruct`, `rlkv identify-duo`),
random heads, and H2O with the token budget at which it holds the RLKV heads' mean bytes. Every
answer is graded against GSM8K's; the result is how many each method gets right and the KV
memory a sequence held.

The problems (`data/demo_gsm8k.json`) are the first of GSM8K's test split that the full cache
answered correctly in at most 180 tokens in rlkv's GPU evaluation of this model: chosen by the
full cache's answers alone, so what the table shows is what each method loses. The window is the
paper's 16 + 64 tokens, the one the heads were identified with. These sequences are about 260
tokens long, so a compressed head still holds 80 of them and sparsity 0.5 saves about a quarter
of the bytes; the savings grow with length, and the table projects them to 8,192 tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkv import methods
from rlkv.generation import Transformers
from rlkv.methods.matching import bytes_over_decoding, match_budget
from rlkv.models import Layout
from rlkv.tasks import GSM8K
from rlkv.tasks.base import Example
from rlkv.tasks.grading import extract_answer

PROBLEMS = Path(__file__).parent / "data" / "demo_gsm8k.json"
LONG = 8192  # the sequence length the memory is also projected to
LEARNED = ("rlkv", "duo")  # the methods whose heads the demo takes; random heads are drawn


def problems(count: int | None = None) -> list[Example]:
    """The demo's GSM8K problems (see the module docstring), the first `count` of them."""
    shipped = json.loads(PROBLEMS.read_text())["problems"]
    return [Example(f"gsm8k-{p['index']}", p["question"], p["answer"]) for p in shipped[:count]]


def at_scale() -> dict:
    """The default heads' accuracy on the whole GSM8K test split at sparsity 0.5 (rlkv's GPU evaluation),
    against which a handful of demo problems can be read: {"accuracy": {method: %}, "sparsity", "source", ...}."""
    return json.loads(PROBLEMS.read_text())["at_scale"]


@dataclass
class Run:
    """One method's answers, their grades and what they cost."""

    label: str
    texts: list[str]
    correct: list[bool]
    tokens: int  # generated, over every problem
    kv_mean: float  # bytes one sequence held, averaged over its decoding steps and the sequences
    kv_full_mean: float  # the same for a full cache
    kv_long: float  # bytes one sequence of LONG tokens would hold
    seconds: float

    @property
    def answers(self) -> list[str | None]:
        """Each completion's final answer as graded (the last \\boxed{}), None where it gave none."""
        return [extract_answer(text) for text in self.texts]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_demo(
    model,
    tokenizer,
    heads: Mapping[str, object],
    questions: int = 8,
    max_new_tokens: int = 256,
    sparsity: float = 0.5,
    sink: int = 16,
    recent: int = 64,
    on_run: Callable[[Run], None] | None = None,
) -> tuple[list[Example], list[Run]]:
    """The first `questions` problems with a full cache, each of `heads` (method -> head scores or their name,
    e.g. {"rlkv": "rlkv:qwen2.5-coder-0.5b-instruct", "duo": "duo:qwen2.5-coder-0.5b-instruct"}) at
    `sparsity`, random heads at `sparsity`, and H2O at the first heads' mean bytes. `on_run(run)` is
    called as each method finishes."""
    if not heads or set(heads) - set(LEARNED):
        raise ValueError(f"demo heads are given per method (rlkv and/or duo), got {sorted(heads) or 'none'}")
    task, examples = GSM8K(), problems(questions)
    prompts = [task.prompt(example, tokenizer) for example in examples]
    layout = Layout.of(model)
    plan = [("full cache", methods.build("full", layout, 0.0))]
    for name, scores in heads.items():
        plan.append((f"{name} heads", methods.build(name, layout, sparsity, heads=scores, sink=sink, recent=recent)))
    plan.append(("random heads", methods.build("random", layout, sparsity, sink=sink, recent=recent)))
    Transformers(model, tokenizer).generate(prompts[:1], max_new_tokens=2)  # set-up, untimed
    runs, samples = [], []
    for label, method in plan:
        run, held = _run(model, tokenizer, method, label, examples, prompts, max_new_tokens, task)
        runs.append(run)
        samples.append(held)
        if on_run is not None:
            on_run(run)
    first_heads = samples[1]  # H2O holds what the first heads held, on the same problems
    match = match_budget(lambda b: methods.build("h2o", layout, sparsity, budget=b), layout, first_heads)
    h2o = methods.build("h2o", layout, sparsity, budget=match.budget)
    run, _ = _run(model, tokenizer, h2o, f"h2o, {match.budget} tokens", examples, prompts, max_new_tokens, task)
    runs.append(run)
    if on_run is not None:
        on_run(run)
    return examples, runs


def _run(model, tokenizer, method, label, examples, prompts, max_new_tokens, task) -> tuple[Run, list[dict]]:
    """Greedy answers to `prompts` under `method` in one batch, graded, with the bytes its cache held."""
    runner = Transformers(model, tokenizer, method, batch_size=len(prompts))
    start = time.perf_counter()
    outs = runner.generate(prompts, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    samples: list[dict] = [{"prompt_tokens": o.prompt_tokens, "tokens": len(o.tokens)} for o in outs]
    held = bytes_over_decoding(runner.store.sequence_nbytes, samples)
    for sample, (_, nbytes) in zip(samples, held):
        sample["kv_bytes_mean"] = float(nbytes.mean())
    per_token = Layout.of(model).kv_bytes_per_token()
    run = Run(
        label=label,
        texts=[o.text for o in outs],
        correct=[task.grade(example, o.text) == 1.0 for example, o in zip(examples, outs)],
        tokens=sum(len(o.tokens) for o in outs),
        kv_mean=sum(s["kv_bytes_mean"] for s in samples) / len(samples),
        kv_full_mean=sum(float(steps.double().mean()) * per_token for steps, _ in held) / len(held),
        kv_long=float(runner.store.sequence_nbytes(torch.tensor([float(LONG)]))[0]),
        seconds=seconds,
    )
    return run, samples
