"""`rlkv serve`: an OpenAI-compatible HTTP server over rlkv's online engine.

    app = rlkv.serve.create_app(rlkv.Engine(model, tok, method, kv_budget="20GiB"), tok, "my-model")
    rlkv.serve.serve(app, host="127.0.0.1", port=8000)
    engine = rlkv.serve.EngineProcess(rlkv.serve.EngineSpec("DIR", "rlkv", 0.5, heads="heads.json"))
    app = rlkv.serve.create_app(engine, engine.tokenizer, "my-model")   # the engine in its own process
    replicas, tok = rlkv.serve.start_replicas(rlkv.serve.EngineSpec("DIR"), 4)  # 4 engine processes, a GPU each

Modules, in the order a request meets them: `auth` (the API key), `app` (routes, body limit, the
work off the event loop, streaming, errors), `protocol` (the OpenAI request / response models, their
bounds), `replicas` (several engines behind one server, `rlkv serve --data-parallel N`: each request to
the one with the least work outstanding, "degraded" health while some are down), `async_engine`
(per-request streams; the engine in a thread), `engine_process` (the engine in a process of its own,
restarted when it dies, as `rlkv serve` runs it), `detokenize` (incremental text and stop strings for
streaming), `responses` (choices, stream chunks and usage from the engine's outputs), `logprobs`
(OpenAI's log-prob shapes), `reasoning` (<think> ... </think> as reasoning_content), `metrics`
(Prometheus), `server` (uvicorn, signals, exit on a failed engine), `process` (`rlkv serve` as a child
process, for tests and benchmarks).
"""

from rlkv.serve.app import create_app
from rlkv.serve.async_engine import AsyncEngine, EngineStopped, Streams
from rlkv.serve.engine_process import EngineProcess, EngineSpec
from rlkv.serve.replicas import Replicas, start_replicas
from rlkv.serve.server import serve

__all__ = [
    "AsyncEngine",
    "EngineProcess",
    "EngineSpec",
    "EngineStopped",
    "Replicas",
    "Streams",
    "create_app",
    "serve",
    "start_replicas",
]
