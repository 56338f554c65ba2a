"""What the engine reports about itself: `EngineStats` of the latest `generate` call, `EngineMetrics`
(its state now and its totals, what the server's /metrics serves)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Throughput and memory of the latest `generate` call."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    decode_steps: int = 0
    prefill_forwards: int = 0
    max_running: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0  # context tokens preempted requests prefilled again (their K/V was given up)
    pool_bytes: int = 0
    pages: int = 0
    peak_pages_used: int = 0
    peak_memory: int = 0  # bytes of GPU memory at the peak (CUDA only)
    loaded_seconds: float = 0.0  # spent while requests waited for room: the KV budget (or max_batch) was the limit
    loaded_tokens: int = 0  # generated in that time

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def loaded_tokens_per_s(self) -> float | None:
        """Throughput under load (steady serving): free of the ramp-down once the queue is empty,
        whose length depends on how the request count divides into waves. None: nothing ever waited."""
        return self.loaded_tokens / self.loaded_seconds if self.loaded_seconds else None


@dataclass
class EngineMetrics:
    """The engine's state now and its totals since it was built (what `/metrics` serves)."""

    running: int  # admitted: holding a slot (prefilling or decoding)
    waiting: int
    pages_total: int  # kept heads' KV pages (token droppers: slots)
    pages_used: int
    preemptions: int
    generated_tokens: int
    prompt_tokens: int
    finished_requests: int
    recomputed_tokens: int = 0  # context tokens of preempted requests, prefilled again when they resume
