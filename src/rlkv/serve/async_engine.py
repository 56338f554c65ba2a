"""`AsyncEngine`: the online layer between asyncio request handlers and the (synchronous) Engine.

One background thread owns the Engine: it calls `step()` while requests are unfinished and sleeps
on its inbox otherwise. Handlers never touch the engine's state; they post "add" and "abort"
messages to a thread-safe queue that the thread applies between steps. Each request's outputs go
to its own asyncio queue: all of a step's outputs in one `loop.call_soon_threadsafe` (one wake-up
of the event loop per step, not per request), and a reader that fell behind gets the outputs
queued for it merged into one (fewer, larger deltas under load). A handler reads them from an
async iterator; leaving it early (the client disconnected, a stop string ended the text, the
task was cancelled) aborts the request, which frees its KV pages before the next step.

`shutdown()` (safe from a signal handler) makes the thread abort every request, end every stream
with `EngineStopped`, and exit; so the server can close in-flight streams at once on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, replace

import torch

from rlkv.engine import Engine, RequestError, RequestOutput, SamplingParams

log = logging.getLogger("rlkv.serve")


class EngineStopped(RuntimeError):
    """The engine is shutting down (or its thread failed): the request cannot finish."""


@dataclass
class _Sink:
    """Where a request's outputs go: its asyncio queue, filled on its event loop."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: _Sink


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
        self._sinks: dict[str, _Sink] = {}  # owned by the engine thread
        self._ready: list[tuple[_Sink, RequestOutput | BaseException]] = []  # to deliver after this step
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
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(_Add(request_id, prompt_ids, params, sink))
        finished = False
        try:
            while not finished:
                out = _merged(await sink.outputs.get(), sink.outputs)
                finished = isinstance(out, BaseException) or out.finished
                if isinstance(out, BaseException):
                    raise out
                yield out
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            if self.engine.device.type == "cuda":  # a new thread starts on the default device
                torch.cuda.set_device(self.engine.device)
            while self._apply(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                        if sink is not None:  # None: aborted meanwhile
                            self._ready.append((sink, out))
                self._deliver()
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
                    self._sinks[msg.request_id] = msg.sink
                except RequestError as err:
                    self._ready.append((msg.sink, err))
            elif self._sinks.pop(msg.request_id, None) is not None:
                self.engine.abort_request(msg.request_id)
        return True

    def _deliver(self) -> None:
        """Hand the ready outputs to their event loops: one callback per loop."""
        by_loop = defaultdict(list)
        for sink, item in self._ready:
            by_loop[sink.loop].append((sink.outputs, item))
        self._ready = []
        for loop, items in by_loop.items():
            with suppress(RuntimeError):  # the event loop has closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)

    def _end_all(self, err: EngineStopped) -> None:
        """Abort every request, and end its stream (and those of requests not added yet) with `err`."""
        for request_id, sink in self._sinks.items():
            with suppress(Exception):
                self.engine.abort_request(request_id)
            self._ready.append((sink, err))
        self._sinks.clear()
        with suppress(queue.Empty):
            while True:
                msg = self._inbox.get_nowait()
                if isinstance(msg, _Add):
                    self._ready.append((msg.sink, err))
        self._deliver()


def _put_all(items) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


def _merged(first, outputs: asyncio.Queue):
    """`first` and the outputs queued behind it as one (their tokens joined); an error ends the merge."""
    while not isinstance(first, BaseException) and not first.finished and not outputs.empty():
        nxt = outputs.get_nowait()
        if isinstance(nxt, BaseException):
            return nxt
        first = replace(nxt, new_token_ids=first.new_token_ids + nxt.new_token_ids)
    return first
