"""`EngineProcess`: the engine in a process of its own, as vLLM splits its API server from its engine core.

In one process, the HTTP side (request parsing, detokenizing, server-sent events for hundreds of
streams) and the engine's step loop take turns on Python's GIL, so the device waits for the host.
Here a child process (started with "spawn": CUDA cannot be forked) builds the engine from an
`EngineSpec` and runs the loop; the server keeps only the tokenizer (sent by the child, so both
sides tokenize alike) and the engine's `RequestLimits`, so a request that could never run is
refused before anything is sent. Two pipes connect them:
- to the child: ("add", id, prompt ids, SamplingParams), ("abort", id), ("stop",), written by one
  sender thread (so `shutdown` is safe from a signal handler);
- from the child: ("outputs", [RequestOutput], refused, EngineMetrics) after every step or batch of
  messages, read by one reader thread that hands each request's outputs to its asyncio queue
  (`rlkv.serve.async_engine`'s streams: the same iterator, merging, abort-on-exit).
The child ignores Ctrl-C (the server orchestrates the shutdown) and exits when its pipe closes, so
it never outlives the server. When it dies (a bug, a device failure, the OOM killer), the reader
thread ends its open streams with `EngineStopped` (HTTP 503: "restarting"), starts a new child and
serves again; messages meant for the dead child never reach the new one. After `restarts` failures
in a row, each soon after its engine started, it gives up: every stream ends and `on_fatal` runs
(`rlkv serve` then exits with status 1, for a supervisor such as systemd or Kubernetes to act).
`EngineSpec.gpu` gives the child one GPU of its own (its CUDA_VISIBLE_DEVICES, set while it starts, as vLLM
starts its data-parallel engines): `rlkv.serve.replicas` runs one engine per GPU that way.
As with any "spawn" child, a script that starts one must do so under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace

from rlkv.engine.stats import EngineMetrics
from rlkv.serve.async_engine import EngineStopped, Streams, run_engine

log = logging.getLogger("rlkv.serve")


@dataclass(frozen=True)
class EngineSpec:
    """How the child builds its engine: `rlkv.load_model(model)`, `rlkv.methods.build(method, ...)`, `rlkv.Engine`."""

    model: str
    method: str = "full"
    sparsity: float = 0.0
    heads: str | None = None
    sink: int = 16
    recent: int = 64
    budget: int | None = None  # token droppers: tokens per KV head
    prefill: str = "full"
    kv_dtype: str = "bf16"  # rlkv.precision: bf16, fp8, fp8-kept
    kv_budget: str | float | None = None
    max_batch: int = 256
    max_seq_len: int | None = None
    gpu: str | None = None  # the one GPU the engine's process sees (its CUDA_VISIBLE_DEVICES); None: the server's

    def build(self):
        """(engine, tokenizer)."""
        import rlkv

        model, tokenizer = rlkv.load_model(self.model)
        options = {} if self.method in rlkv.methods.TOKEN_DROPPING else {"prefill": self.prefill}
        method = rlkv.methods.build(
            self.method,
            rlkv.Layout.of(model),
            self.sparsity,
            heads=self.heads,
            sink=self.sink,
            recent=self.recent,
            budget=self.budget,
            kv_dtype=self.kv_dtype,
            **options,
        )
        engine = rlkv.Engine(
            model, tokenizer, method, kv_budget=self.kv_budget, max_batch=self.max_batch, max_seq_len=self.max_seq_len
        )
        return engine, tokenizer


class _Child:
    """One engine process and its two pipes."""

    def __init__(self, spec: EngineSpec, stopping):
        context = mp.get_context("spawn")
        child_in, self.inbox = context.Pipe(duplex=False)  # (reading end, writing end)
        self.outbox, child_out = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_child_main, args=(spec, child_in, child_out), name="rlkv-engine", daemon=True
        )
        with _sees_only(spec.gpu):
            self.process.start()
        child_in.close()
        child_out.close()
        self.started = time.monotonic()
        self._stopping = stopping

    def wait_ready(self, timeout: float) -> tuple:
        """(limits, tokenizer, metrics) once the engine is built; raises if it fails, exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.outbox.poll(0.2):
            if time.monotonic() > deadline or self._stopping():
                self.kill()
                raise RuntimeError(f"the engine process did not start within {timeout:g} s")
        try:
            kind, *payload = self.outbox.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process exited with {self.process.exitcode} while starting") from None
        if kind == "failed":
            raise payload[0]
        self.started = time.monotonic()
        return tuple(payload)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


class EngineProcess(Streams):
    """The engine of `spec` in a child process, restarted when it dies; `generate` streams one request's
    outputs (see module doc).

    `restarts`: how many failures in a row the server survives, counting only those that came within
    `quick_s` seconds of the engine's start (a failure after a longer life starts the count again); the
    next one ends the server (`on_fatal`). 0: the first failure does, as vLLM's server exits when its
    engine dies."""

    def __init__(self, spec: EngineSpec, startup_timeout: float = 3600, restarts: int = 3, quick_s: float = 60):
        """Start the child and wait until its engine is built (the model loaded); a failure raises its error."""
        super().__init__()
        self.spec, self.startup_timeout, self.max_restarts, self.quick_s = spec, startup_timeout, restarts, quick_s
        self._child = _Child(spec, lambda: self._stopping)
        self.limits, self.tokenizer, self._metrics = self._child.wait_ready(startup_timeout)
        self._earlier = _Totals()  # what engines before this one counted
        self._quick_failures = 0
        self._send_lock = threading.Lock()  # `_child` is replaced only while no message is being sent
        self._reader = threading.Thread(target=self._supervise, name="rlkv-engine-reader", daemon=True)
        self._sender = threading.Thread(target=self._send, name="rlkv-engine-sender", daemon=True)
        self._started = False

    def metrics(self) -> EngineMetrics:
        """The engine's state after its latest step (or batch of messages); counters include earlier engines'."""
        return self._earlier.added_to(self._metrics)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._reader.start()
            self._sender.start()

    def join(self, timeout: float | None = None) -> None:
        self.shutdown()
        if self._reader.is_alive():
            self._reader.join(timeout)
        self._child.process.join(timeout)
        self._child.kill()
        self._messages.put((None, None))  # ends the sender

    def _alive(self) -> bool:
        return self._child.process.is_alive()

    # ------------------------------------------------------------------ the transport
    def _post(self, message: tuple) -> None:
        self._messages.put((self._child, message))  # for this engine only: a restarted one never sees it

    def _send(self) -> None:
        while True:
            child, message = self._messages.get()
            if child is None:
                return
            with self._send_lock:
                if child is self._child:
                    with suppress(BrokenPipeError, EOFError, OSError):  # a dead child: `_supervise` sees it too
                        child.inbox.send(message)

    def _supervise(self) -> None:
        """Route each engine's outputs until it ends; restart it after a failure, give up after too many."""
        while True:
            failure = self._read(self._child)
            if failure is None or self._stopping:
                self._end_all(EngineStopped("the server is shutting down"))
                return
            log.error("the engine failed: %s", failure)
            self._earlier.add(self._metrics)
            self._metrics = _nothing_held(self._metrics)
            quick = time.monotonic() - self._child.started < self.quick_s
            self._quick_failures = self._quick_failures + 1 if quick else 1
            if self._quick_failures > self.max_restarts:
                self._give_up(
                    RuntimeError(
                        f"{failure} ({self._quick_failures} failures in a row, each within {self.quick_s:g} s)"
                    )
                )
                return
            with self._lock:
                self.restarting = EngineStopped(f"the engine failed ({failure}) and is restarting: retry shortly")
            self._fail_open(self.restarting)
            self._child.kill()
            try:
                child = _Child(self.spec, lambda: self._stopping)
                self._metrics = child.wait_ready(self.startup_timeout)[2]
            except BaseException as err:
                if self._stopping:
                    self._end_all(EngineStopped("the server is shutting down"))
                else:
                    self._give_up(RuntimeError(f"{failure}; restarting it failed: {err}"))
                return
            with self._send_lock:
                self._child = child
            self.restarts += 1
            log.warning("the engine restarted (%d restarts)", self.restarts)
            with self._lock:
                self.restarting = None

    def _read(self, child: _Child) -> str | None:
        """Route `child`'s outputs to their streams until it ends; what went wrong (None: it was told to stop)."""
        try:
            while True:
                kind, *payload = child.outbox.recv()
                if kind == "failed":
                    return f"{type(payload[0]).__name__}: {payload[0]}"
                outputs, errors, self._metrics = payload
                self._route(outputs, errors)
        except (EOFError, OSError):
            if self._stopping:
                return None
            child.process.join(2)
            return f"the engine process exited with code {child.process.exitcode}"

    def _give_up(self, error: BaseException) -> None:
        log.error("the engine failed for good: %s", error)
        self.error = error
        self.on_fatal()
        self._end_all(EngineStopped(f"the engine failed: {error}; the server is exiting"))
        self._child.kill()


@dataclass
class _Totals:
    """Counters of engines that have died, so /metrics counts on across restarts."""

    preemptions: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_requests: int = 0

    def add(self, m: EngineMetrics) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(m, name))

    def added_to(self, m: EngineMetrics) -> EngineMetrics:
        return replace(m, **{name: getattr(self, name) + getattr(m, name) for name in vars(self)})


def _nothing_held(m: EngineMetrics) -> EngineMetrics:
    """A dead engine's metrics: no request, no page used, its counters moved to `_Totals`."""
    return replace(m, running=0, waiting=0, pages_used=0, **{name: 0 for name in vars(_Totals())})


_ENVIRONMENT = threading.Lock()  # replicas restarting at once each start their child with its own GPU


@contextmanager
def _sees_only(gpu: str | None) -> Iterator[None]:
    """While a child starts: CUDA_VISIBLE_DEVICES=`gpu` in the environment it inherits (None: left as it is)."""
    if gpu is None:
        yield
        return
    with _ENVIRONMENT:
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        try:
            yield
        finally:
            if before is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


def _child_main(spec: EngineSpec, inbox, outbox) -> None:
    """The engine process: build the engine, then apply messages and step until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    try:
        engine, tokenizer = spec.build()
        if engine.device.type == "cuda":
            import torch

            torch.cuda.set_device(engine.device)
    except BaseException as err:  # reported to the server, which exits with it
        with suppress(Exception):
            outbox.send(("failed", _picklable(err)))
        return
    outbox.send(("ready", engine.limits, tokenizer, engine.metrics()))

    def receive(block: bool) -> list[tuple]:
        messages = [inbox.recv()] if block else []
        while inbox.poll():
            messages.append(inbox.recv())
        return messages

    try:
        run_engine(
            engine, receive, lambda outputs, refused: outbox.send(("outputs", outputs, refused, engine.metrics()))
        )
    except (EOFError, BrokenPipeError, OSError):
        return  # the server is gone
    except BaseException as err:  # a bug or a device failure: every open request fails
        log.exception("the engine process failed")
        with suppress(Exception):
            outbox.send(("failed", _picklable(err)))


def _picklable(err: BaseException) -> BaseException:
    """`err`, or a RuntimeError with its text when it cannot cross the pipe."""
    import pickle

    try:
        pickle.dumps(err)
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
