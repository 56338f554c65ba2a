"""The rlkv generation engine: per-head KV pools, continuous batching, CUDA graphs, a fused decode kernel.

    engine = rlkv.Engine(model, tok, method=rlkv.methods.HeadSplit(keep, sink=16, recent=64), kv_budget="20GiB")
    outs = engine.generate(prompts, temperature=0.6, top_p=0.95, max_new_tokens=8192, seed=0)

Modules, in the order a request meets them: `engine` (scheduling, forwards, CUDA graphs),
`kv` (pages and rings), `attention` (store + attend, torch reference paths), `kernel` (the
Triton decode kernel), `tokendrop` (slots for H2O / SnapKV / R-KV), `sampling` (seeded,
batch-independent sampling).
"""

from rlkv.engine.engine import ENGINE_SETTINGS, Completion, Engine, EngineStats, Gated, check_setting, engine_for

__all__ = ["ENGINE_SETTINGS", "Completion", "Engine", "EngineStats", "Gated", "check_setting", "engine_for"]
