"""`EngineProcess`: the engine in a process of its own, as vLLM splits its API server from its engine core.

In one process, the HTTP side (request parsing, detokenizing, server-sent events for hundreds of
streams) and the engine's step loop take turns on Python's GIL, so the device waits for the host.
Here a child process (started with "spawn": CUDA cannot be forked) builds the engine from an
`EngineSpec` and runs the loop; the server keeps only the tokenizer (sent by the child, so both
sides tokenize alike) and the engine's `RequestLimits`, so a request that could never run is
refused before anything is sent. Two pipes connect them:
- to the child: ("add", id, prompt ids, SamplingParams), ("abort", id), ("stop",), written by one
  sender thread (so `shutdown` is safe from a signal handler);
- from the child: ("outputs", [RequestOutput], EngineMetrics) after every step or batch of
  messages, read by one reader thread that hands each request's outputs to its asyncio queue
  (`rlkv.serve.async_engine`'s streams: the same iterator, merging, abort-on-exit).
The child ignores Ctrl-C (the server orchestrates the shutdown) and exits when its pipe closes, so
it never outlives the server. As with any "spawn" child, a script that starts one must do so under
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from contextlib import suppress
from dataclasses import dataclass

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
    kv_budget: str | float | None = None
    max_batch: int = 256
    max_seq_len: int | None = None

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
            **options,
        )
        engine = rlkv.Engine(
            model, tokenizer, method, kv_budget=self.kv_budget, max_batch=self.max_batch, max_seq_len=self.max_seq_len
        )
        return engine, tokenizer


class EngineProcess(Streams):
    """The engine of `spec` in a child process; `generate` streams one request's outputs (see module doc)."""

    def __init__(self, spec: EngineSpec, startup_timeout: float = 3600):
        """Start the child and wait until its engine is built (the model loaded); a failure raises its error."""
        super().__init__()
        context = mp.get_context("spawn")
        child_in, self._to_child = context.Pipe(duplex=False)  # (reading end, writing end)
        self._from_child, child_out = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_child_main, args=(spec, child_in, child_out), name="rlkv-engine", daemon=True
        )
        self._process.start()
        child_in.close()
        child_out.close()
        if not self._from_child.poll(startup_timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start within {startup_timeout:g} s")
        try:
            kind, *payload = self._from_child.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited with {self._process.exitcode} while starting") from None
        if kind == "failed":
            raise payload[0]
        self.limits, self.tokenizer, self._metrics = payload
        self._reader = threading.Thread(target=self._read, name="rlkv-engine-reader", daemon=True)
        self._sender = threading.Thread(target=self._send, name="rlkv-engine-sender", daemon=True)
        self._started = False

    def metrics(self) -> EngineMetrics:
        """The engine's state after its latest step (or batch of messages)."""
        return self._metrics

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._reader.start()
            self._sender.start()

    def join(self, timeout: float | None = None) -> None:
        self.shutdown()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._reader.is_alive():
            self._reader.join(5)

    def _alive(self) -> bool:
        return self._process.is_alive()

    # ------------------------------------------------------------------ the transport
    def _send(self) -> None:
        while True:
            msg = self._messages.get()
            try:
                self._to_child.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                return
            if msg[0] == "stop":
                return

    def _read(self) -> None:
        """Route the child's outputs to their streams until it exits; then end every open stream."""
        reason = EngineStopped("the server is shutting down")
        try:
            while True:
                kind, *payload = self._from_child.recv()
                if kind == "failed":
                    self.error = payload[0]
                    reason = EngineStopped(f"the engine failed: {payload[0]}")
                    break
                outputs, errors, self._metrics = payload
                self._route(outputs, errors)
        except (EOFError, OSError):
            if not self._stopping:
                self._process.join(2)
                self.error = RuntimeError(f"the engine process exited with {self._process.exitcode}")
                reason = EngineStopped(f"the engine failed: {self.error}")
        if self.error is not None:
            log.error("%s", reason)
        self._end_all(reason)


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
