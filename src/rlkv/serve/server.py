"""`serve`: run the app under uvicorn until Ctrl-C or SIGTERM, or until its engine fails for good.

On the first signal the engine (its thread or its process) aborts every request at once (their
streams end with an error event, whole answers with 503), so uvicorn's graceful shutdown does not
wait for long generations; then the app's lifespan joins it. A second Ctrl-C forces uvicorn to exit.
An engine that failed for good (`Streams.on_fatal`) shuts the server down the same way, and `serve`
returns False, so that `rlkv serve` exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._runner = app.state.runner
        self._runner.on_fatal = self._engine_failed

    def _engine_failed(self) -> None:  # from the engine transport's thread: uvicorn polls the flag
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        self._runner.shutdown()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> bool:
    """Serve `app` (from `rlkv.serve.create_app`) on host:port until shut down; False if its engine failed for good."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10, timeout_keep_alive=30
    )
    _Server(config, app).run()
    return app.state.runner.error is None
