"""rlkv: per-head KV cache compression for reasoning LLMs.

model, tok = rlkv.load_model("Qwen/Qwen2.5-1.5B-Instruct")   # hub id, local dir or .gguf
heads = rlkv.HeadScores.load("heads.json")
with rlkv.compress(model, heads, sparsity=0.5, sink=16, recent=64) as c:
    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=512)
print(c.cache.nbytes())

engine = rlkv.Engine(model, tok, rlkv.methods.HeadSplit.from_scores(heads, 0.5), kv_budget="20GiB")
outs = engine.generate(prompts, max_new_tokens=8192, temperature=0.6, top_p=0.95, seed=0)

heads = rlkv.identify(model, tok, rlkv.tasks.get("math_train"), problems, rlkv.IdentifyConfig(), "runs/id")
run = rlkv.identify_pipeline(model_id, "math_train", rlkv.IdentifyConfig(), "runs/id")  # curriculum + check too
outs = rlkv.generate(model, tok, prompts, method=method)   # the engine on a GPU, transformers on a CPU
"""

import sys
import types
from importlib import import_module
from importlib.util import find_spec
from typing import Any

# Where each public name lives. They are imported on first use, so `import rlkv` (and `rlkv --help`)
# does not pay for torch and transformers until something needs them.
_EXPORTS = {
    "Completion": "rlkv.engine",
    "Engine": "rlkv.engine",
    "EvalConfig": "rlkv.eval",
    "FullCache": "rlkv.hf",
    "Gated": "rlkv.engine",
    "HeadScores": "rlkv.heads",
    "HeadSplitCache": "rlkv.hf",
    "IdentifyConfig": "rlkv.identify",
    "Layout": "rlkv.models",
    "RequestError": "rlkv.engine",
    "SamplingParams": "rlkv.engine",
    "SUPPORTED_ARCHS": "rlkv.models",
    "cache_nbytes": "rlkv.hf",
    "compress": "rlkv.hf",
    "evaluate": "rlkv.eval",
    "generate": "rlkv.generation",
    "identify": "rlkv.identify",
    "identify_pipeline": "rlkv.identify",
    "load_model": "rlkv.models",
    "select_problems": "rlkv.identify",
}
__all__ = [*_EXPORTS, "methods", "tasks"]


def __getattr__(name: str) -> Any:
    """A public name from its module, or a submodule (`rlkv.methods`, `rlkv.hf`), imported on first use."""
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and find_spec(f"rlkv.{name}") is not None:
        value = import_module(f"rlkv.{name}")
    else:
        raise AttributeError(f"module 'rlkv' has no attribute {name!r}")
    globals()[name] = value  # once found, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`rlkv.identify` is the function, as it always was, not the subpackage of the same name: importing
    the subpackage (which sets it as an attribute of its parent) leaves the name alone."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


from rlkv.version import __version__  # noqa: E402, F401 (plain data, no heavy import; re-exported)
