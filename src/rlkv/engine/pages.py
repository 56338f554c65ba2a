"""The KV pool's pages: who holds each one (a reference count) and what a full one holds (a content hash).

A sequence's page table lists its pages; a page may be listed by several sequences, and goes back to
the free list when the last of them lets it go. The `n` samples of one prompt share the prompt's full
pages this way, each with a copy of the partly filled last page it writes into (vLLM v1's block pool,
`vllm/v1/core/block_pool.py`; SGLang's radix cache shares the same unit). A full page is also named by
the hash of its tokens chained to its predecessors' (vLLM's block hash: the page's K/V depend on every
token before it), kept while the page lives, so that a prefix cache can find and reuse pages by content.
"""

from __future__ import annotations

import hashlib
from array import array

from rlkv.engine.store import free_list

ROOT = b"rlkv-pages"  # the hash chain's start


def page_hashes(tokens: list[int], page_size: int) -> list[bytes]:
    """The chained content hash of each full page of a sequence of `tokens`: page i's hash covers tokens
    [0, (i + 1) * page_size), so equal hashes mean equal prefixes."""
    hashes, parent = [], ROOT
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = hashlib.sha256(parent + array("q", tokens[start : start + page_size]).tobytes()).digest()
        hashes.append(parent)
    return hashes


class PagePool:
    """Page ids 1 .. num_pages - 1 (page 0 is scratch space for padding rows) with reference counts and the
    content hashes of full pages."""

    def __init__(self, num_pages: int):
        self._free = free_list(num_pages)
        self.refs = [0] * num_pages
        self.hashes: dict[int, bytes] = {}  # page -> content hash, for full pages of a known context

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """`count` free pages, each held once; the caller checks `free` first."""
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self.refs[page] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more holder of each of `pages`."""
        for page in pages:
            self.refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """One holder fewer of each of `pages`; those nobody holds go back to the free list (lowest first out)."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if not self.refs[page]:
                self.hashes.pop(page, None)
                self._free.append(page)

    def name(self, pages: list[int], tokens: list[int], page_size: int) -> None:
        """Record the content hashes of the full pages of a sequence whose pages hold `tokens`."""
        self.hashes.update(zip(pages, page_hashes(tokens, page_size)))
