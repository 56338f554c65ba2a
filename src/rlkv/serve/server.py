"""`serve`: run the app under uvicorn until Ctrl-C or SIGTERM.

On the first signal the engine (its thread or its process) aborts every request at once (their
streams end with an error event, whole answers with 503), so uvicorn's graceful shutdown does not
wait for long generations; then the app's lifespan joins it. A second Ctrl-C forces uvicorn to exit.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._runner = app.state.runner

    def handle_exit(self, sig, frame) -> None:
        self._runner.shutdown()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` (from `rlkv.serve.create_app`) on host:port; returns after a clean shutdown."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10, timeout_keep_alive=30
    )
    _Server(config, app).run()
