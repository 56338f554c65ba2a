"""`Replicas`: several engines behind one server (`rlkv serve --data-parallel N`), as vLLM and SGLang put copies
of an engine behind one endpoint.

    replicas, tokenizer = start_replicas(EngineSpec("DIR", kv_budget=0.8), 4)   # one engine process per GPU
    app = rlkv.serve.create_app(replicas, tokenizer, "my-model")

Each replica is a `Streams` of its own, with its own KV pool: `start_replicas` starts `EngineProcess`es at once,
each child seeing one GPU (its CUDA_VISIBLE_DEVICES; on a machine without CUDA, N processes on the CPU). A
request goes whole (its n samples, its stream) to the replica that can take it with the least work outstanding:
the prompt tokens, and the tokens its samples may still generate, of the requests it holds, counted here as
streams start, advance and end; ties go to the lower index. A replica that is restarting or failed for good
gets no request; the streams it held end with `EngineStopped` naming it (HTTP 503), the others go on, and
/health says "degraded" and which replica is down. The server stops serving only when no replica is left,
and exits (`on_fatal`) once every one failed for good. /metrics sums the replicas and shows each
(`rlkv.serve.metrics`). Across machines, replicas are plain `rlkv serve` processes behind an HTTP load balancer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import aclosing
from dataclasses import fields, replace
from functools import partial

from rlkv.engine import RequestOutput, SamplingParams
from rlkv.engine.stats import EngineMetrics
from rlkv.serve.async_engine import EngineStopped, Streams
from rlkv.serve.detokenize import Detokenizer
from rlkv.serve.engine_process import EngineProcess, EngineSpec

log = logging.getLogger("rlkv.serve")


class Replicas:
    """Routes each request to one of `replicas` (see module doc); what the app sees, as it sees one `Streams`."""

    def __init__(self, replicas: Sequence[Streams]):
        if not replicas:
            raise ValueError("Replicas needs at least one replica")
        self.replicas = list(replicas)
        self._load = [0] * len(self.replicas)  # tokens outstanding per replica (read and written on the event loop)
        self._stopping = False
        self.error: BaseException | None = None  # set once every replica failed for good
        self.on_fatal = lambda: None  # called then (from the last one's transport thread)
        for i, replica in enumerate(self.replicas):
            replica.on_fatal = partial(self._failed, i)

    # ------------------------------------------------------------------ what the app reads
    @property
    def max_seq_len(self) -> int:
        return min(r.max_seq_len for r in self.replicas)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise `RequestError` unless every replica could run the request (their KV pools may differ in size)."""
        for replica in self.replicas:
            replica.check_request(prompt_ids, params)

    def status(self) -> EngineStopped | None:
        """Why a new request cannot run now (None: a replica can take it)."""
        if self._stopping:
            return EngineStopped("the server is shutting down")
        if self._serving():
            return None
        reasons = "; ".join(f"replica {i}: {r.status()}" for i, r in enumerate(self.replicas))
        return EngineStopped(f"no replica can take requests ({reasons})")

    @property
    def restarting(self) -> EngineStopped | None:
        """While no replica serves and one of them is restarting: what new requests get."""
        if any(r.restarting is not None for r in self.replicas):
            return self.status()
        return None

    def health(self) -> dict:
        """/health's body while a replica serves: "ok", or "degraded" while others are down, with each one's state."""
        states = [_state(r) | {"replica": i} for i, r in enumerate(self.replicas)]
        return {"status": "ok" if all(s["status"] == "ok" for s in states) else "degraded", "replicas": states}

    @property
    def healthy(self) -> bool:
        return not self._stopping and any(r.healthy for r in self.replicas)

    @property
    def open_streams(self) -> int:
        return sum(r.open_streams for r in self.replicas)

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    def metrics(self) -> EngineMetrics:
        """The replicas' metrics summed."""
        each = [r.metrics() for r in self.replicas]
        return EngineMetrics(**{f.name: sum(getattr(m, f.name) for m in each) for f in fields(EngineMetrics)})

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    def shutdown(self) -> None:
        """Abort everything and stop every replica soon; returns at once (callable from a signal handler)."""
        self._stopping = True
        for replica in self.replicas:
            replica.shutdown()

    def join(self, timeout: float | None = None) -> None:
        self.shutdown()
        for replica in self.replicas:
            replica.join(timeout)

    # ------------------------------------------------------------------ requests
    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        detokenizers: list[Detokenizer] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """As `Streams.generate`: check the request now, then stream it from the replica it goes to when iteration
        starts."""
        self.check_request(prompt_ids, params)
        if (why := self.status()) is not None:
            raise why
        return self._stream(request_id, prompt_ids, params, detokenizers)

    async def _stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams, detokenizers):
        i = self._least_loaded()
        replica = self.replicas[i]
        outputs = replica.generate(request_id, prompt_ids, params, detokenizers)
        left = [params.max_tokens] * params.n  # each sample's tokens still to come, at most
        held = len(prompt_ids) + sum(left)
        self._load[i] += held
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    left[out.index] = 0 if out.finished else left[out.index] - len(out.new_token_ids)
                    now = len(prompt_ids) + sum(left)
                    self._load[i] += now - held
                    held = now
                    yield out
        except EngineStopped as err:
            if self._stopping:
                raise
            if replica.error is not None:
                raise EngineStopped(f"replica {i} failed for good: {replica.error}") from None
            raise EngineStopped(f"replica {i}: {err}") from None
        finally:
            self._load[i] -= held

    def _least_loaded(self) -> int:
        """The replica that can take a request with the least work outstanding (the lowest index among equals)."""
        live = [i for i, r in enumerate(self.replicas) if r.status() is None]
        if not live:
            raise self.status() or EngineStopped("no replica can take requests")
        return min(live, key=lambda i: (self._load[i], i))

    def _serving(self) -> bool:
        return any(r.status() is None for r in self.replicas)

    def _failed(self, index: int) -> None:
        """Replica `index` failed for good: the others serve on; when none is left, the server exits."""
        failed = [i for i, r in enumerate(self.replicas) if r.error is not None]
        log.error(
            "replica %d failed for good: %s (%d of %d replicas left)",
            index,
            self.replicas[index].error,
            len(self.replicas) - len(failed),
            len(self.replicas),
        )
        if len(failed) == len(self.replicas):
            self.error = RuntimeError(
                "every replica failed: " + "; ".join(f"replica {i}: {r.error}" for i, r in enumerate(self.replicas))
            )
            self.on_fatal()


def _state(replica: Streams) -> dict:
    """A replica's line in /health: "ok", else "restarting", "failed" (for good) or "stopped", and why."""
    why = replica.status()
    if why is None:
        return {"status": "ok"}
    state = "failed" if replica.error is not None else "restarting" if replica.restarting is not None else "stopped"
    return {"status": state, "reason": str(why)}


def replica_gpus(count: int) -> list[str | None]:
    """The GPU each of `count` replicas sees alone (a CUDA_VISIBLE_DEVICES entry): the first `count` of those this
    process sees; None each on a machine without CUDA. Raises ValueError if fewer GPUs are visible."""
    import torch

    if not torch.cuda.is_available():
        return [None] * count
    visible = torch.cuda.device_count()
    if count > visible:
        raise ValueError(f"{count} replicas need {count} GPUs, one each, and only {visible} visible")
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in named.split(",")] if named else [str(i) for i in range(visible)]
    return list(ids[:count])


def start_replicas(spec: EngineSpec, count: int, restarts: int = 3) -> tuple[Replicas, object]:
    """(`count` engine processes of `spec` behind a `Replicas`, their tokenizer), started at once (one GPU each on
    CUDA); `restarts` as `EngineProcess`'s, per replica. If one fails to start, the others stop and its error
    raises."""
    specs = [replace(spec, gpu=gpu) for gpu in replica_gpus(count)]
    with ThreadPoolExecutor(count, thread_name_prefix="rlkv-replica-start") as pool:
        starting = [pool.submit(EngineProcess, s, restarts=restarts) for s in specs]
        wait(starting)
    failure = next((f.exception() for f in starting if f.exception() is not None), None)
    started = [f.result() for f in starting if f.exception() is None]
    if failure is not None:
        for replica in started:
            replica.start()
            replica.join(10)
        raise failure
    return Replicas(started), started[0].tokenizer
