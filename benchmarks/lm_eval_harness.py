"""lm-evaluation-harness itself through `rlkv serve`: a loglikelihood task and a generate_until task on local data,
each number checked against a transformers forward / `rlkv.generate` on the same token ids.

Two tasks written as lm-eval task YAMLs over local files (no hub): `rlkv_gsm8k_mc`, multiple choice built
from GSM8K test problems (the right final answer among three other problems' answers; lm-eval scores each
choice's log-likelihood through `/v1/completions` with `echo`, `logprobs` and `max_tokens` 1), and
`rlkv_gsm8k`, GSM8K generate_until (greedy, stopped at "Question:" or a blank line). For each sparsity a
server is started (`python -m rlkv serve`; sparsity > 0 with `--prefill compressed`, so compressed heads
apply their rule inside the prompt too and the scores differ from the full cache's) and lm-eval's
`local-completions` model runs both tasks against it with its Hugging Face tokenizer, as a user would
(`lm_eval --model local-completions --model_args base_url=...,tokenizer=DIR`). References, in-process on
the same token ids lm-eval sent: every choice's log-likelihood and is-greedy flag from a forward's
log-softmax (inside `rlkv.compress` for sparsity > 0), every generation from `rlkv.generate` on the
transformers path with the same method. One row per sparsity: accuracy, exact match, the largest
log-likelihood difference, and how many flags and generations agree.

    python benchmarks/lm_eval_harness.py --model DIR_OR_GGUF --heads heads.json --sparsities 0,0.5 \
        --mc-items 100 --gen-items 50 --out results/lm_eval_harness.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from common import print_table, write_result

import rlkv
from rlkv.serve.process import ServerProcess

NAME = "rlkv-model"
MC_TASK = """task: rlkv_gsm8k_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_TASK = """task: rlkv_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
"""


def gsm8k(data_dir: Path, count: int) -> list[dict]:
    with open(data_dir / "gsm8k_test.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def write_tasks(folder: Path, data_dir: Path, mc_items: int, gen_items: int, max_gen_toks: int) -> None:
    """The two task YAMLs and their data files in `folder` (an lm-eval include path)."""
    problems = gsm8k(data_dir, max(mc_items, gen_items) + 3)
    finals = [p["answer"].split("####")[-1].strip() for p in problems]
    rng = random.Random(0)
    with open(folder / "mc.jsonl", "w") as f:
        for i, p in enumerate(problems[:mc_items]):
            others = rng.sample([a for a in dict.fromkeys(finals) if a != finals[i]], 3)
            label = rng.randrange(4)
            choices = others[:label] + [finals[i]] + others[label:]
            f.write(json.dumps({"question": p["question"], "choices": choices, "label": label}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for p in problems[:gen_items]:
            f.write(json.dumps(p) + "\n")
    (folder / "rlkv_gsm8k_mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"))
    (folder / "rlkv_gsm8k.yaml").write_text(GEN_TASK.format(data=folder / "gen.jsonl", max_gen_toks=max_gen_toks))


def method_for(model, sparsity: float, heads: str | None, sink: int, recent: int):
    """What the server runs at `sparsity` (`rlkv serve`'s choice of method), with a compressed prefill."""
    if sparsity == 0:
        return None, []
    name = "rlkv" if heads else "random"
    method = rlkv.methods.build(
        name, rlkv.Layout.of(model), sparsity, heads=heads, sink=sink, recent=recent, prefill="compressed"
    )
    args = ["--method", name, "--sparsity", str(sparsity), "--sink", str(sink), "--recent", str(recent)]
    args += ["--prefill", "compressed", *(["--heads", heads] if heads else [])]
    return method, args


def run_lm_eval(url: str, tokenizer_dir: Path, tasks_dir: Path, limit: int, batch_size: int) -> dict:
    """lm-eval's results with samples, its `local-completions` model pointed at the server."""
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    lm = LocalCompletionsAPI(
        base_url=f"{url}/v1/completions",
        model=NAME,
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        batch_size=batch_size,
        max_retries=1,
        max_length=2048,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["rlkv_gsm8k_mc", "rlkv_gsm8k"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        limit=limit,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {"results": results["results"], "samples": results["samples"], "lm": lm}


def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) and whether every continuation token is the greedy one, from one forward."""
    ids = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, len(context) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation, device=logits.device)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def check(model, tokenizer, method, run: dict, max_gen_toks: int) -> dict:
    """Compare lm-eval's numbers to the in-process references on the token ids it sent."""
    lm = run["lm"]
    worst, greedy_equal, scored, total = 0.0, 0, 0, 0.0
    scope = (
        nullcontext()
        if method is None
        else rlkv.compress(model, method.keep, sink=method.sink, recent=method.recent, prefill="compressed")
    )
    with scope:
        for sample in run["samples"]["rlkv_gsm8k_mc"]:
            for (context, continuation), ((ll, greedy),) in zip(sample["arguments"], sample["resps"]):
                ctx, cont = lm._encode_pair(context, continuation)
                want, want_greedy = loglikelihood(model, ctx, cont)
                worst = max(worst, abs(ll - want))
                greedy_equal += greedy == want_greedy
                scored += 1
                total += ll
    samples = run["samples"]["rlkv_gsm8k"]
    prompts = [lm.tok_encode(s["arguments"][0][0]) for s in samples]
    until = samples[0]["arguments"][0][1]["until"] if samples else []
    references = rlkv.generate(
        model, tokenizer, prompts, method, max_new_tokens=max_gen_toks, stop=until, engine="off", batch_size=1
    )
    same = sum(s["resps"][0][0] == r.text for s, r in zip(samples, references))
    return {
        "mc_choices": scored,
        "mean_loglikelihood": total / max(scored, 1),
        "max_loglikelihood_diff": worst,
        "is_greedy_equal": greedy_equal,
        "generations": len(samples),
        "generations_equal": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", default=None, help="head scores for rlkv (else random heads at sparsity > 0)")
    parser.add_argument("--sparsities", default="0,0.5")
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--mc-items", type=int, default=20)
    parser.add_argument("--gen-items", type=int, default=10)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per /v1/completions request")
    parser.add_argument("--kv-budget", default="1GiB")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="results/lm_eval_harness.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model, tokenizer = rlkv.load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer.save_pretrained(tmp / "tokenizer")  # lm-eval's own tokenizer, as from a model directory
        (tmp / "tasks").mkdir()
        write_tasks(tmp / "tasks", Path(args.data_dir), args.mc_items, args.gen_items, args.max_gen_toks)
        for sparsity in map(float, args.sparsities.split(",")):
            method, method_args = method_for(model, sparsity, args.heads, args.sink, args.recent)
            server = ServerProcess(
                ["--model", args.model, "--served-model-name", NAME, "--kv-budget", args.kv_budget, *method_args],
                tmp / f"serve-{sparsity}.log",
            )
            try:
                server.wait_ready(600)
                limit = max(args.mc_items, args.gen_items)
                run = run_lm_eval(server.url, tmp / "tokenizer", tmp / "tasks", limit, args.batch_size)
            finally:
                server.close()
            row = {
                "sparsity": sparsity,
                "acc": run["results"]["rlkv_gsm8k_mc"]["acc,none"],
                "exact_match": run["results"]["rlkv_gsm8k"]["exact_match,none"],
                **check(model, tokenizer, method, run, args.max_gen_toks),
            }
            rows.append(row)
            print_table(rows, list(row))
    write_result(args.out, {"model": args.model, "heads": args.heads, "rows": rows})


if __name__ == "__main__":
    main()
