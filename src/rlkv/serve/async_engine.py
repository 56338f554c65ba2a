"""The online layer between asyncio request handlers and the (synchronous) Engine.

`Streams` is what handlers see, whatever runs the engine: `generate(id, prompt ids, params,
detokenizers)` checks the request at once (`RequestError`: it can never run) and returns an async
iterator of its outputs, those of its `params.n` samples interleaved (`RequestOutput.index`). Each
request's outputs go to its own asyncio queue, all of a step's outputs in one
`loop.call_soon_threadsafe` (one wake-up of the event loop per step, not per request); a reader that
fell behind gets the outputs queued for it merged into one per sample (fewer, larger deltas under
load). With a `Detokenizer` per sample, the transport's thread decodes each output's text
(`RequestOutput.text`) before it reaches the event loop (the EOS or stop id that ends a sample is
no text), and finishes a sample at its first stop string. Leaving the iterator early (the client
disconnected, the task was cancelled) aborts the request, which frees its KV pages before the next
step. `shutdown()` (safe from a signal handler) aborts every request and ends every stream with
`EngineStopped`, so the server can close in-flight streams at once on Ctrl-C.

Two transports implement it: `AsyncEngine` runs a given Engine in a thread of this process (for
an Engine built in Python); `rlkv.serve.engine_process.EngineProcess` runs it in a child process
(what `rlkv serve` uses: the HTTP side then never competes with the step loop for the GIL) and
restarts it when it dies. An engine that failed for good calls `on_fatal` (the server then exits).
`rlkv.serve.replicas.Replicas` routes requests over several of them (`rlkv serve --data-parallel N`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncGenerator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace

import torch

from rlkv.engine import Engine, RequestError, RequestLimits, RequestOutput, SamplingParams
from rlkv.engine.stats import EngineMetrics
from rlkv.serve.detokenize import Detokenizer

log = logging.getLogger("rlkv.serve")


class EngineStopped(RuntimeError):
    """The engine is shutting down, restarting or failed: the request cannot finish (HTTP 503)."""


class RequestFailed(RuntimeError):
    """The engine failed on this request alone (a bug it met taking it); the others go on (HTTP 500)."""


@dataclass
class _Sink:
    """Where a request's outputs go: its asyncio queue, filled on its event loop; its samples' text decoders, and
    which samples have had their last output (the transport's thread alone reads and writes `ended`)."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    detokenizers: list[Detokenizer] | None
    samples: int
    ended: set[int] = field(default_factory=set)


class Streams:
    """Per-request output streams over some transport to an engine (see module doc). Messages for the engine
    (("add", id, prompt ids, params), ("abort", id[, sample index]), ("stop",)) go through `_post`, which the transport
    carries to `run_engine`; it calls `_route` with what each step reported, `_fail_open` when its engine died
    and `_end_all` when the engine stops for good. Subclasses set `limits` (the engine's `RequestLimits`) and
    provide `metrics()`, `_alive()`, `start` and `join`."""

    limits: RequestLimits

    def __init__(self):
        self._messages: queue.SimpleQueue = queue.SimpleQueue()  # put from any thread, a signal handler too
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()  # _sinks and `restarting`: the event loop and the transport's thread
        self._stopping = False
        self._ended: EngineStopped | None = None  # set once every stream was ended: later ones end at once
        self.error: BaseException | None = None  # why the engine failed for good, if it did
        self.restarting: EngineStopped | None = None  # while a failed engine restarts: what new requests get
        self.restarts = 0
        self.on_fatal = lambda: None  # called once the engine failed for good (from the transport's thread)

    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.limits.check(prompt_ids, params)

    def metrics(self) -> EngineMetrics:
        raise NotImplementedError

    def _alive(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def join(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    @property
    def open_streams(self) -> int:
        return len(self._sinks)

    @property
    def healthy(self) -> bool:
        return self._alive() and not self._stopping and self.error is None and self.restarting is None

    def status(self) -> EngineStopped | None:
        """Why a new request cannot run now (None: it can)."""
        if self._stopping:
            return EngineStopped("the server is shutting down")
        if self.error is not None:
            return EngineStopped(f"the engine failed: {self.error}")
        if self.restarting is not None:
            return self.restarting
        return None if self._alive() else EngineStopped("the engine is not running")

    def health(self) -> dict:
        """/health's body while it serves."""
        return {"status": "ok"}

    def shutdown(self) -> None:
        """Abort everything and stop the engine soon; returns at once (callable from a signal handler)."""
        if not self._stopping:
            self._stopping = True
            self._post(("stop",))

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        detokenizers: list[Detokenizer] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Check the request now (RequestError: it can never run), then stream its samples' outputs (with their
        text, if `detokenizers` are given: one per sample, made with `params.stop`).

        The request is submitted when iteration starts and aborted if iteration stops before its
        last output (the iterator closed, or the awaiting task cancelled)."""
        self.check_request(prompt_ids, params)
        if (why := self.status()) is not None:
            raise why
        return self._stream(request_id, prompt_ids, params, detokenizers)

    def _post(self, message: tuple) -> None:
        self._messages.put(message)

    async def _stream(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, detokenizers: list[Detokenizer] | None
    ) -> AsyncGenerator[RequestOutput, None]:
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue(), detokenizers, params.n)
        with self._lock:
            if (why := self._ended or self.restarting) is not None:  # the engine stopped after `generate` checked
                raise why
            self._sinks[request_id] = sink
            self._post(("add", request_id, prompt_ids, params))
        running = set(range(params.n))
        try:
            while running:
                queued = [await sink.outputs.get()]
                while not sink.outputs.empty():
                    queued.append(sink.outputs.get_nowait())
                for out in _merged(queued):
                    if out.finished:
                        running.discard(out.index)
                    yield out
        finally:
            if running:
                with self._lock:
                    self._sinks.pop(request_id, None)
                self._post(("abort", request_id))

    def _route(self, outputs: list[RequestOutput], errors: Sequence[tuple[str, BaseException]] = ()) -> None:
        """Hand a step's outputs (and requests refused on arrival) to their streams: one callback per event loop.
        Outputs of samples a stop string already ended here are dropped."""
        ready: list[tuple[_Sink, RequestOutput | BaseException]] = []
        with self._lock:
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None and out.request_finished:
                    self._sinks.pop(out.request_id)
                if sink is not None and out.index not in sink.ended:  # None: aborted meanwhile
                    ready.append((sink, out))
            for request_id, err in errors:
                if (sink := self._sinks.pop(request_id, None)) is not None:
                    ready.append((sink, err))
        _deliver([(sink, self._with_text(sink, item)) for sink, item in ready])

    def _with_text(self, sink: _Sink, out):
        """`out` with its new text, finished (and its sample aborted) if the text reached a stop string."""
        if not isinstance(out, RequestOutput):
            return out
        if out.finished:
            sink.ended.add(out.index)
        if sink.detokenizers is None:
            return out
        detok = sink.detokenizers[out.index]
        ended_by_id = out.finished and out.finish_reason == "eos"  # EOS or a stop id: not text, as in vLLM
        text = detok.add(out.new_token_ids[:-1] if ended_by_id else out.new_token_ids)
        if out.finished or detok.stopped:
            text += detok.finish()
        if detok.stopped and not out.finished:
            sink.ended.add(out.index)
            last = len(sink.ended) == sink.samples
            if last:
                with self._lock:
                    self._sinks.pop(out.request_id, None)
            self._post(("abort", out.request_id, out.index))
            return replace(out, text=text, finished=True, finish_reason="stop", request_finished=last)
        return replace(out, text=text)

    def _fail_open(self, err: EngineStopped) -> None:
        """End every open stream with `err` (its engine died); later streams go to the next engine."""
        with self._lock:
            ready = [(sink, err) for sink in self._sinks.values()]
            self._sinks.clear()
        _deliver(ready)

    def _end_all(self, err: EngineStopped) -> None:
        """End every open stream with `err`, and any stream opened later."""
        with self._lock:
            self._ended = err
        self._fail_open(err)


class AsyncEngine(Streams):
    """Runs `engine` in a background thread of this process: it calls `step()` while requests are unfinished
    and sleeps on the messages otherwise, applying them between steps."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine, self.limits = engine, engine.limits
        self._thread = threading.Thread(target=self._run, name="rlkv-engine", daemon=True)

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()  # safe from any thread

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _alive(self) -> bool:
        return self._thread.is_alive()

    def _receive(self, block: bool) -> list[tuple]:
        messages = [self._messages.get()] if block else []
        with suppress(queue.Empty):
            while True:
                messages.append(self._messages.get_nowait())
        return messages

    def _run(self) -> None:
        reason = EngineStopped("the server is shutting down")
        try:
            if self.engine.device.type == "cuda":  # a new thread starts on the default device
                torch.cuda.set_device(self.engine.device)
            run_engine(self.engine, self._receive, self._route)
        except BaseException as err:  # a bug or a device failure: an Engine given in Python cannot be rebuilt
            log.exception("the engine thread failed")
            self.error = err
            reason = EngineStopped(f"the engine failed: {err}")
        if self.error is not None:
            self.on_fatal()
        self._end_all(reason)


def run_engine(engine: Engine, receive, emit) -> None:
    """The engine's loop, in whichever thread or process owns the engine: apply the messages `receive(block)`
    returns (("add", id, prompt ids, params), ("abort", id[, index]), ("stop",); it waits for one if `block`), step
    while requests are unfinished, and `emit(outputs, refused)` after every round. A request whose adding
    raises is refused alone; an exception in a step ends the loop (the engine's state is unknown). Returns
    at "stop"; open requests are aborted however it ends."""
    open_ids: set[str] = set()
    try:
        while True:
            refused: list[tuple[str, Exception]] = []
            for kind, *args in receive(not engine.has_unfinished()):
                if kind == "stop":
                    return
                if kind == "add":
                    try:
                        engine.add_request(*args)
                        open_ids.add(args[0])
                    except RequestError as err:
                        refused.append((args[0], err))
                    except Exception as err:  # a bug that this request alone meets: it fails, the rest go on
                        log.exception("adding request %s failed", args[0])
                        refused.append((args[0], RequestFailed(f"the engine failed on this request: {err!r}")))
                elif args[0] in open_ids:
                    if len(args) == 1:  # the whole request (else one sample)
                        open_ids.discard(args[0])
                    engine.abort_request(*args)
            outputs = engine.step() if engine.has_unfinished() else []
            open_ids.difference_update(out.request_id for out in outputs if out.request_finished)
            emit(outputs, refused)
    finally:
        for request_id in open_ids:
            with suppress(Exception):
                engine.abort_request(request_id)


def _deliver(ready: Sequence[tuple[_Sink, RequestOutput | BaseException]]) -> None:
    by_loop = defaultdict(list)
    for sink, item in ready:
        by_loop[sink.loop].append((sink.outputs, item))
    for loop, items in by_loop.items():
        with suppress(RuntimeError):  # the event loop has closed: nobody is listening
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


def _merged(queued: list) -> list[RequestOutput]:
    """The queued outputs as one per sample (their tokens, text and log-probs joined), in the order the samples
    first come; a queued error is raised instead."""
    if (err := next((item for item in queued if isinstance(item, BaseException)), None)) is not None:
        raise err
    merged: dict[int, RequestOutput] = {}
    for out in queued:
        first = merged.get(out.index)
        merged[out.index] = out if first is None else joined(first, out)
    return list(merged.values())


def joined(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one sample as one."""
    return replace(
        later,
        new_token_ids=first.new_token_ids + later.new_token_ids,
        text=first.text + later.text,
        logprobs=first.logprobs + later.logprobs,
        prompt_logprobs=first.prompt_logprobs or later.prompt_logprobs,
    )
