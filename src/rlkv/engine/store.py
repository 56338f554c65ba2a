"""What the engine needs of whatever holds a method's K/V: one interface, two stores.

`rlkv.engine.kv.KVStore` (head splits and gated rollouts: pages for kept heads, a sink + recent
ring per sequence for compressed ones) and `rlkv.engine.tokendrop.TokenDropStore` (token droppers:
a fixed slot of tokens per sequence, no pages) both implement `Store` (their sequence slots through
`Slots`); the scheduler and the step loop use nothing else of them. Slot 0 and page 0 are scratch
space for a batch's padding rows. A request's n samples are forked from one prefill: `share` (the
full pages, by reference) then `fork` (a copy of the rest) after it.
"""

from __future__ import annotations

from typing import Protocol, SupportsInt, runtime_checkable


def free_list(n: int) -> list[int]:
    """Ids 1 .. n - 1 to hand out with `pop()`, lowest first (id 0 is scratch space for padding rows)."""
    return list(range(n - 1, 0, -1))


class Slots:
    """The sequence slots of a store, handed out lowest first; slot 0 is never handed out (scratch)."""

    num_slots: int
    _free_slots: list[int]

    def _init_slots(self, n: int) -> None:
        self.num_slots, self._free_slots = n, free_list(n)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def has_slot(self) -> bool:
        return bool(self._free_slots)

    def take_slot(self) -> int:
        if not self._free_slots:
            raise RuntimeError(f"{type(self).__name__}.take_slot called without a free slot (check has_slot first)")
        return self._free_slots.pop()

    def _release_slot(self, slot: int) -> None:
        self._free_slots.append(slot)


@runtime_checkable
class Store(Protocol):
    num_slots: int  # sequence slots, the scratch slot included
    page_size: int  # tokens per page (a store without pages: 0)
    peak_pages_used: int

    @property
    def capacity_pages(self) -> int:
        """Pages sequences can hold (0: a store without pages)."""
        ...

    @property
    def free_pages(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of `tokens` tokens holds."""
        ...

    def has_slot(self) -> bool: ...

    def take_slot(self) -> int: ...

    def grow(self, slot: int, pages: list[int], tokens: int) -> bool:
        """Extend `pages` to hold `tokens` tokens; False, taking nothing, if the pool is short."""
        ...

    def flush(self) -> None:
        """Make the pages handed out since the last flush visible to the device (page tables)."""
        ...

    def release(self, slot: int, pages: list[int]) -> None:
        """Give back the slot, and `pages` (each goes back to the pool once nobody holds it)."""
        ...

    def shared_pages(self, tokens: int) -> int:
        """Pages a sequence forked after `tokens` tokens shares with its origin."""
        ...

    def share(self, slot: int, pages: list[int], tokens: int) -> list[int]:
        """The pages a new sequence in `slot`, forked after `tokens` tokens from one holding `pages`, shares."""
        ...

    def fork(self, src_slot: int, src_pages: list[int], dst_slot: int, dst_pages: list[int], tokens: int) -> None:
        """Copy into the forked sequence what it does not share of the origin's first `tokens` tokens."""
        ...

    def name_pages(self, pages: list[int], tokens: list[int]) -> None:
        """Record the content hashes of the full pages holding `tokens` (for a prefix cache)."""
        ...

    def nbytes(self) -> int:
        """Bytes allocated for K/V (and the policy state a store keeps)."""
        ...

    def sequence_nbytes(self, tokens) -> SupportsInt:
        """Bytes a sequence of `tokens` tokens holds."""
        ...
