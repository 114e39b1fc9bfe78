"""Paged-KV block allocator with reference counts and a hash-chained prefix cache.

Pure Python, no torch: the engine and the planner's simulator run this very code.

Every block is in exactly one of three states at every moment:

* **free**: reference count 0, holds nothing worth keeping (in ``_free``);
* **cached**: reference count 0, holds a full block of KV that a later request with the
  same prefix may reuse; evictable, least recently released first (in ``_evictable``);
* **in use**: reference count > 0 (owned by one or more sequences, or by a KV handoff).

A full block is identified by a chained hash: ``hash(parent block's hash, this block's
token ids)``, so two blocks match only when their whole prefixes match. Hashes are
blake2b digests (stable across processes, so a router can compute them too).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes

_ROOT_HASH: BlockHash = b""


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: equal iff the whole prefix up to this block is equal."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def hash_prefix_blocks(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``, in order."""
    hashes: list[BlockHash] = []
    parent = _ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


class OutOfBlocks(RuntimeError):
    """Raised by :meth:`BlockAllocator.allocate` when fewer blocks are available than asked.

    Callers are expected to check :meth:`BlockAllocator.num_available` first; reaching this
    is a caller bug, and the allocator state is unchanged when it is raised.
    """


@dataclass(frozen=True)
class PrefixMatch:
    """Blocks reused from the prefix cache; their reference counts were already taken."""

    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class AllocatorStats:
    num_blocks: int
    num_free: int
    num_cached: int
    num_in_use: int
    prefix_queries: int
    prefix_hit_blocks: int


class BlockAllocator:
    """Reference-counted pool of ``num_blocks`` KV pages of ``block_size`` tokens each.

    Invariants (checked by :meth:`check_invariants`, asserted in tests):
    free, cached and in-use sets partition ``range(num_blocks)``; a cached block's hash
    maps back to it; the reference count of a block is the number of holders that took it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # Lowest ids first: keeps a small deployment's pages compact and tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self._hash_to_block: dict[BlockHash, int] = {}
        self._block_to_hash: dict[int, BlockHash] = {}
        self._prefix_queries = 0
        self._prefix_hit_blocks = 0

    # ------------------------------------------------------------------ queries
    def num_available(self) -> int:
        """Blocks that :meth:`allocate` can hand out now (free plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def stats(self) -> AllocatorStats:
        in_use = sum(1 for count in self._ref_counts if count > 0)
        return AllocatorStats(
            num_blocks=self.num_blocks,
            num_free=len(self._free),
            num_cached=len(self._evictable),
            num_in_use=in_use,
            prefix_queries=self._prefix_queries,
            prefix_hit_blocks=self._prefix_hit_blocks,
        )

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ mutations
    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks (reference count 1 each), evicting least recently used cached
        blocks once the free list is empty. All or nothing: raises :class:`OutOfBlocks`."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count > self.num_available():
            raise OutOfBlocks(f"asked for {count} blocks, {self.num_available()} available")
        taken: list[int] = []
        for _ in range(count):
            if self._free:
                block_id = self._free.pop()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                del self._hash_to_block[self._block_to_hash.pop(block_id)]
            self._ref_counts[block_id] = 1
            taken.append(block_id)
        return taken

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. Blocks reaching zero become cached (if they hold a
        registered full block) or free. Freed in reverse so a sequence's tail is evicted first."""
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if block_id in self._block_to_hash:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> PrefixMatch:
        """Reuse cached blocks holding a prefix of ``token_ids``, covering at most ``max_tokens``.

        Each matched block gains one reference for the caller. Callers pass
        ``max_tokens = len(token_ids) - 1`` so at least one token is left to compute: a
        request needs logits, and the last token is never written into a shared block.
        """
        if not self.enable_prefix_caching:
            return PrefixMatch((), 0)
        self._prefix_queries += 1
        matched: list[int] = []
        parent = _ROOT_HASH
        limit = min(len(token_ids), max_tokens)
        for start in range(0, limit - self.block_size + 1, self.block_size):
            parent = hash_block(parent, token_ids[start : start + self.block_size])
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
            matched.append(block_id)
        self._prefix_hit_blocks += len(matched)
        return PrefixMatch(tuple(matched), len(matched) * self.block_size)

    def register_full_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Offer a full, fully computed, in-use block to the prefix cache.

        Returns False (and changes nothing) when caching is off, the block is already
        registered, or another block already holds the same hash (first writer wins, so a
        hash always names exactly one block)."""
        if not self.enable_prefix_caching:
            return False
        if self._ref_counts[block_id] <= 0:
            raise RuntimeError(f"cannot cache block {block_id}: it is not in use")
        if block_id in self._block_to_hash or block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        return True

    # ------------------------------------------------------------------ checking
    def check_invariants(self) -> None:
        """Raise AssertionError if the free / cached / in-use partition is broken."""
        free = set(self._free)
        cached = set(self._evictable)
        in_use = {b for b, count in enumerate(self._ref_counts) if count > 0}
        assert len(free) == len(self._free), "duplicate block in free list"
        assert not (free & cached) and not (free & in_use) and not (cached & in_use), "block in two states"
        assert free | cached | in_use == set(range(self.num_blocks)), "block in no state (leaked)"
        assert all(count >= 0 for count in self._ref_counts)
        for block_hash, block_id in self._hash_to_block.items():
            assert self._block_to_hash[block_id] == block_hash
        assert cached <= set(self._block_to_hash), "evictable block without a hash"
