"""Which requests hold memory: admission, pages as sequences grow, and preemption when the pool runs dry.

Two admission policies (`ADMISSION`):
- "demand" (the default, vLLM's): a request is admitted when its context (plus the token it will
  sample next) fits in the free pages with a watermark to spare; a running sequence then takes a page
  each `page_size` tokens. When a decode step needs pages the pool does not have, the most recently
  admitted requests are preempted (their pages and slot go back; they wait at the front of the
  queue, to be prefilled again from prompt + generated tokens: recompute, as vLLM does) until the
  older ones fit. In a step that preempted, nothing is admitted (no thrash).
- "reserve" (the engine's former policy, kept as the baseline): a request is admitted only with
  every page its prompt + max_tokens could need; it never grows, never preempts.
Token droppers' stores hold a fixed slot per sequence and no pages: admission is a free slot.
A request's n samples are admitted together: the first with its pages, each other one with a slot,
a reference to the prompt's full pages (`Store.share`) and pages of its own for the rest; only the
first is prefilled, the others are forked from it (`rlkv.engine.engine`). A sample preempted before
that is on its own from then on (prefilled alone, its output unchanged).
Host-side bookkeeping only: the engine launches the forwards.
"""

from __future__ import annotations

from collections import deque

from rlkv.engine.request import Request
from rlkv.engine.store import Store

ADMISSION = ("demand", "reserve")


class Scheduler:
    """The waiting queue and the admitted requests (holding a slot and pages), oldest first."""

    def __init__(self, store: Store, max_batch: int, admission: str = "demand", watermark: float = 0.01):
        if admission not in ADMISSION:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION)}, got {admission!r}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be a share of the pool in [0, 1), got {watermark!r}")
        self.store, self.max_batch, self.admission = store, max_batch, admission
        self.watermark = round(watermark * store.capacity_pages)
        self.waiting: deque[Request] = deque()
        self.admitted: list[Request] = []
        self.preemptions = 0
        self.recomputed_tokens = 0  # context tokens of preempted requests, to be prefilled again

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def _tokens_at_admission(self, req: Request) -> int:
        if self.admission == "reserve":
            return len(req.prompt) + req.params.max_tokens
        return len(req.context) + 1  # its context, and the token its prefill samples (fed by the next decode step)

    def admit(self) -> list[Request]:
        """Admit waiting requests in order while they have slots and the pool has room; returns those to prefill
        (a request's forks are admitted with it, to be forked after its prefill)."""
        new = []
        while self.waiting:
            req = self.waiting[0]
            tokens, group = self._tokens_at_admission(req), req.samplers
            own = self.store.pages_for(tokens) - self.store.shared_pages(len(req.context))
            need = self.store.pages_for(tokens) + len(req.forks) * own
            spare = self.watermark if self.admitted else 0  # alone, a request may take the whole pool
            room = min(self.max_batch - len(self.admitted), self.store.free_slots)
            if len(group) > room or need + spare > self.store.free_pages:
                break
            self.waiting.popleft()
            req.slot = self.store.take_slot()
            self.store.grow(req.slot, req.pages, tokens)
            for fork in req.forks:
                fork.slot = self.store.take_slot()
                fork.pages = self.store.share(fork.slot, req.pages, len(req.context))
                self.store.grow(fork.slot, fork.pages, tokens)
            self.admitted += group
            new.append(req)
        return new

    def shortfall(self, running: list[Request]) -> int:
        """Pages the pool lacks for every running request's next decode step (0: they all fit)."""
        need = sum(max(0, self.store.pages_for(r.length) - len(r.pages)) for r in running)
        return max(0, need - self.store.free_pages)

    def preempt_for(self, running: list[Request]) -> list[Request]:
        """Preempt the newest admitted requests until the others' next decode step fits; returns them."""
        victims = []
        while self.shortfall([r for r in running if r.slot >= 0]) and self.admitted:
            victim = self.admitted.pop()
            self.store.release(victim.slot, victim.pages)
            victim.preempted()
            victims.append(victim)
            self.preemptions += 1
            self.recomputed_tokens += len(victim.context)
        self.waiting.extendleft(victims)  # the newest first, so the oldest victim leads the queue
        return victims

    def grow(self, running: list[Request]) -> None:
        """Pages for each running request's next token (after `preempt_for`, they fit)."""
        for req in running:
            if not self.store.grow(req.slot, req.pages, req.length):
                raise RuntimeError("the KV pool ran dry after preemption: Scheduler.preempt_for first")

    def release(self, req: Request) -> None:
        """A finished or aborted sequence gives back its slot and pages (shared ones once nobody holds them)."""
        if req.slot >= 0:
            self.store.release(req.slot, req.pages)
            req.slot, req.pages = -1, []
        if req in self.admitted:
            self.admitted.remove(req)

    def remove_waiting(self, req: Request) -> bool:
        if req in self.waiting:
            self.waiting.remove(req)
            return True
        return False
