"""The rlkv generation engine: per-head KV pools, pages on demand, preemption, a compiled step, CUDA graphs.

    engine = rlkv.Engine(model, tok, method=rlkv.methods.HeadSplit(keep, sink=16, recent=64), kv_budget="20GiB")
    outs = engine.generate(prompts, temperature=0.6, top_p=0.95, max_new_tokens=8192, seed=0)
    engine.add_request("r1", prompt_ids, rlkv.SamplingParams(max_tokens=512)); engine.step()  # online

Modules, in the order a request meets them: `request` (sampling parameters, a request's state,
outputs), `scheduler` (admission, pages on demand, preemption), `engine` (the step loop and its
API, n samples forked from one prefill), `runner` (forwards, sampling, CUDA graphs), `compiled` (the
decode step compiled around attention), `stats` (what it reports), `runtime` (which store and attention
a method runs on), `store` (their interface), `kv` (pages and rings), `pages` (reference counts and
content hashes of pages), `attention` (store + attend as one operator, torch reference paths), `kernel`
(the Triton decode kernels), `tokendrop` (slots for H2O / SnapKV / R-KV), `sampling` (seeded,
batch-independent sampling), `logits` (penalties, min_tokens, top log-probs).
"""

from rlkv.engine.engine import ENGINE_SETTINGS, Engine, EngineMetrics, EngineStats, check_setting, engine_for
from rlkv.engine.request import (
    Completion,
    RequestError,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    degenerate,
)
from rlkv.engine.runtime import Gated

__all__ = [
    "ENGINE_SETTINGS",
    "Completion",
    "Engine",
    "EngineMetrics",
    "EngineStats",
    "Gated",
    "RequestError",
    "RequestLimits",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprobs",
    "check_setting",
    "degenerate",
    "engine_for",
]
