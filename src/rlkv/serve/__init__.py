"""`rlkv serve`: an OpenAI-compatible HTTP server over rlkv's online engine.

    app = rlkv.serve.create_app(rlkv.Engine(model, tok, method, kv_budget="20GiB"), tok, "my-model")
    rlkv.serve.serve(app, host="127.0.0.1", port=8000)

Modules, in the order a request meets them: `app` (routes, streaming, errors), `protocol` (the
OpenAI request / response models), `async_engine` (the engine thread and per-request streams),
`detokenize` (incremental text for streaming), `metrics` (Prometheus), `server` (uvicorn, signals).
"""

from rlkv.serve.app import create_app
from rlkv.serve.async_engine import AsyncEngine, EngineStopped
from rlkv.serve.server import serve

__all__ = ["AsyncEngine", "EngineStopped", "create_app", "serve"]
