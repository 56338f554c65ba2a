"""rlkv: per-head KV cache compression for reasoning LLMs.

    model, tok = rlkv.load_model("Qwen/Qwen2.5-1.5B-Instruct")   # hub id, local dir or .gguf
    heads = rlkv.HeadScores.load("heads.json")
    with rlkv.compress(model, heads, sparsity=0.5, sink=16, recent=64) as c:
        out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=512)
    print(c.cache.nbytes())

    outs = rlkv.generate(model, tok, prompts, rlkv.methods.HeadSplit.from_scores(heads, 0.5), max_new_tokens=512)

    engine = rlkv.Engine(model, tok, rlkv.methods.HeadSplit.from_scores(heads, 0.5), kv_budget="20GiB")
    outs = engine.generate(prompts, max_new_tokens=8192, temperature=0.6, top_p=0.95, seed=0)

    heads = rlkv.identify(model, tok, rlkv.tasks.get("math_train"), problems, rlkv.IdentifyConfig(), "runs/id")
    run = rlkv.identify_pipeline(model_id, "math_train", rlkv.IdentifyConfig(), "runs/id")  # curriculum + check too
"""

from rlkv import methods, tasks
from rlkv.engine import Completion, Engine, Gated, RequestError, SamplingParams
from rlkv.eval import EvalConfig, evaluate
from rlkv.generation import generate
from rlkv.heads import HeadScores
from rlkv.hf import HeadSplitCache, cache_nbytes, compress
from rlkv.identify import IdentifyConfig, identify, identify_pipeline, select_problems
from rlkv.models import SUPPORTED_ARCHS, Layout, load_model
from rlkv.version import __version__  # noqa: F401 (rlkv.__version__)

__all__ = [
    "Completion",
    "Engine",
    "EvalConfig",
    "Gated",
    "HeadScores",
    "HeadSplitCache",
    "IdentifyConfig",
    "Layout",
    "RequestError",
    "SamplingParams",
    "SUPPORTED_ARCHS",
    "cache_nbytes",
    "compress",
    "evaluate",
    "generate",
    "identify",
    "identify_pipeline",
    "load_model",
    "methods",
    "select_problems",
    "tasks",
]
