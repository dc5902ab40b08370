"""KV-block accounting for one attention rank, with prefix caching of full blocks: each full
block is named by a hash chain over its tokens and every token before it; blocks are shared by
reference count, and unreferenced cached blocks are evicted least recently used first."""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(token_ids: list[int], block_size: int, num_blocks: int) -> list[int]:
    """Hash chain of the first num_blocks full blocks of token_ids."""
    hashes, parent = [], 0
    for b in range(num_blocks):
        parent = hash((parent, tuple(token_ids[b * block_size : (b + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        # free blocks, least recently used first; they keep their cached content until reused
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_queries = self.num_hits = 0  # prompt tokens looked up / found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, num_blocks: int) -> list[int]:
        assert self.can_allocate(num_blocks), "allocate() called without can_allocate()"
        ids = []
        for _ in range(num_blocks):
            block, _ = self.free.popitem(last=False)
            self._uncache(block)
            self.ref_count[block] = 1
            ids.append(block)
        return ids

    def free_blocks(self, block_ids: list[int]) -> None:
        # last blocks first, so a sequence's tail is evicted before its shared prefix
        for block in reversed(block_ids):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None

    # -- prefix cache ------------------------------------------------------------------------
    def lookup(self, hashes: list[int]) -> list[int]:
        """Cached blocks for the longest prefix of `hashes`."""
        hits = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def acquire(self, blocks: list[int]) -> None:
        """Takes a reference on cached blocks found by lookup()."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1

    def register(self, block: int, h: int) -> None:
        """A block became full: make its content findable (first writer wins)."""
        if self.enable_prefix_caching and self.block_hash[block] is None and h not in self.cached:
            self.block_hash[block] = h
            self.cached[h] = block

    def _uncache(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
