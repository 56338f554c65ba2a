"""`AsyncEngine`: the online layer between asyncio request handlers and the (synchronous) Engine.

One background thread owns the Engine: it calls `step()` while requests are unfinished and sleeps
on its inbox otherwise. Handlers never touch the engine's state; they post "add" and "abort"
messages to a thread-safe queue that the thread applies between steps, and each request's outputs
come back to its own asyncio queue through `loop.call_soon_threadsafe`. A handler reads them from
an async iterator; leaving it early (the client disconnected, a stop string ended the text, the
task was cancelled) aborts the request, which frees its KV pages before the next step.

`shutdown()` (safe from a signal handler) makes the thread abort every request, end every stream
with `EngineStopped`, and exit; so the server can close in-flight streams at once on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass

from rlkv.engine import Engine, RequestError, RequestOutput, SamplingParams

log = logging.getLogger("rlkv.serve")


class EngineStopped(RuntimeError):
    """The engine is shutting down (or its thread failed): the request cannot finish."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[RequestOutput | BaseException], None]


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncEngine:
    """Runs `engine` in a background thread; `generate` streams one request's outputs (see module doc)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable] = {}  # request id -> deliver; owned by the engine thread
        self._thread = threading.Thread(target=self._run, name="rlkv-engine", daemon=True)
        self._stopping = False
        self.error: BaseException | None = None  # why the engine thread died, if it did

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Abort everything and stop the thread soon; returns at once (callable from a signal handler)."""
        if not self._stopping:
            self._stopping = True
            self._inbox.put(_Stop())

    def join(self, timeout: float | None = None) -> None:
        self.shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.error is None

    # ------------------------------------------------------------------ requests (the event loop)
    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Check the request now (RequestError: it can never run), then stream its outputs.

        The request is submitted when iteration starts and aborted if iteration stops before its
        last output (the iterator closed, or the awaiting task cancelled)."""
        self.engine.check_request(prompt_ids, params)
        if not self.healthy:
            raise EngineStopped("the server is shutting down" if self._stopping else f"the engine failed: {self.error}")
        return self._stream(request_id, prompt_ids, params)

    async def _stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # called in the engine thread
            with suppress(RuntimeError):  # the event loop has closed: nobody is listening
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._inbox.put(_Add(request_id, prompt_ids, params, deliver))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while self._apply(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out)
        except BaseException as err:  # a bug or a device failure: fail every open request, keep serving errors
            log.exception("the engine thread failed")
            self.error = err
            self._end_all(EngineStopped(f"the engine failed: {err}"))

    def _apply(self, block: bool) -> bool:
        """Apply the posted messages (waiting for one if `block`); False once asked to stop."""
        messages = [self._inbox.get()] if block else []
        with suppress(queue.Empty):
            while True:
                messages.append(self._inbox.get_nowait())
        for msg in messages:
            if isinstance(msg, _Stop):
                self._end_all(EngineStopped("the server is shutting down"))
                return False
            if isinstance(msg, _Add):
                try:
                    self.engine.add_request(msg.request_id, msg.prompt_ids, msg.params)
                except RequestError as err:
                    msg.deliver(err)
                    continue
                self._sinks[msg.request_id] = msg.deliver
            elif self._sinks.pop(msg.request_id, None) is not None:
                self.engine.abort_request(msg.request_id)
        return True

    def _deliver(self, out: RequestOutput) -> None:
        deliver = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
        if deliver is not None:  # None: aborted meanwhile
            deliver(out)

    def _end_all(self, err: EngineStopped) -> None:
        """Abort every request, and end its stream (and those of requests not added yet) with `err`."""
        for request_id, deliver in list(self._sinks.items()):
            with suppress(Exception):
                self.engine.abort_request(request_id)
            deliver(err)
        self._sinks.clear()
        with suppress(queue.Empty):
            while True:
                msg = self._inbox.get_nowait()
                if isinstance(msg, _Add):
                    msg.deliver(err)
