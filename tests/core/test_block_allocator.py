"""Block allocator: reference counts, prefix cache, LRU eviction, and the state partition."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hetpd.core.block_allocator import BlockAllocator, OutOfBlocks, hash_prefix_blocks


def test_allocate_and_free_round_trip() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    blocks = alloc.allocate(3)
    assert len(set(blocks)) == 3 and alloc.num_available() == 1
    alloc.free(blocks)
    assert alloc.num_available() == 4
    alloc.check_invariants()


def test_allocate_is_all_or_nothing() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(3)
    assert alloc.num_available() == 2
    alloc.check_invariants()


def test_double_free_is_refused() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    blocks = alloc.allocate(1)
    alloc.free(blocks)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(blocks)


def test_prefix_match_reuses_registered_blocks_and_counts_references() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    blocks = alloc.allocate(3)
    for block_id, block_hash in zip(blocks, hash_prefix_blocks(tokens, 2)):
        assert alloc.register_full_block(block_id, block_hash)
    match = alloc.match_prefix(tokens + [1], max_tokens=5)
    assert match.block_ids == tuple(blocks[:2]) and match.num_tokens == 4
    assert alloc.ref_count(blocks[0]) == 2
    # A different first token changes every chained hash: no match.
    assert alloc.match_prefix([0, 6, 7, 8], max_tokens=3).num_tokens == 0
    alloc.free(list(match.block_ids))
    alloc.free(blocks)
    stats = alloc.stats()
    assert stats.num_cached == 2 and stats.num_in_use == 0
    alloc.check_invariants()


def test_max_tokens_leaves_the_last_token_to_compute() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4]
    blocks = alloc.allocate(2)
    for block_id, block_hash in zip(blocks, hash_prefix_blocks(tokens, 2)):
        alloc.register_full_block(block_id, block_hash)
    assert alloc.match_prefix(tokens, max_tokens=len(tokens) - 1).num_tokens == 2


def test_cached_blocks_are_evicted_least_recently_released_first() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=1)
    a, b = alloc.allocate(2)
    alloc.register_full_block(a, hash_prefix_blocks([1], 1)[0])
    alloc.register_full_block(b, hash_prefix_blocks([2], 1)[0])
    alloc.free([a])
    alloc.free([b])
    assert alloc.allocate(1) == [a]  # a was released first
    assert alloc.match_prefix([1, 0], max_tokens=1).num_tokens == 0  # its hash is gone
    assert alloc.match_prefix([2, 0], max_tokens=1).num_tokens == 1
    alloc.check_invariants()


def test_duplicate_hash_keeps_first_writer() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=1)
    a, b = alloc.allocate(2)
    h = hash_prefix_blocks([3], 1)[0]
    assert alloc.register_full_block(a, h)
    assert not alloc.register_full_block(b, h)
    alloc.free([a, b])
    assert alloc.stats().num_cached == 1 and alloc.stats().num_free == 1


class AllocatorMachine(RuleBasedStateMachine):
    """Random interleavings of allocate / share / register / free keep the partition intact."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(num_blocks=12, block_size=2)
        self.holders: list[list[int]] = []  # each holder owns one reference to each of its blocks
        self.registered = 0

    @rule(count=st.integers(0, 5))
    def allocate(self, count: int) -> None:
        if count <= self.alloc.num_available():
            self.holders.append(self.alloc.allocate(count))
        else:
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate(count)

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data())
    def register(self, data: st.DataObject) -> None:
        holder = data.draw(st.sampled_from(self.holders))
        if holder:
            self.registered += 1
            tokens = [self.registered, self.registered]
            self.alloc.register_full_block(holder[0], hash_prefix_blocks(tokens, 2)[0])

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.holders) - 1))
        self.alloc.free(self.holders.pop(index))

    @rule(token=st.integers(1, 20))
    def match(self, token: int) -> None:
        match = self.alloc.match_prefix([token, token, 0], max_tokens=2)
        self.holders.append(list(match.block_ids))

    @invariant()
    def partition_holds(self) -> None:
        self.alloc.check_invariants()
        expected: dict[int, int] = {}
        for holder in self.holders:
            for block in holder:
                expected[block] = expected.get(block, 0) + 1
        for block in range(self.alloc.num_blocks):
            assert self.alloc.ref_count(block) == expected.get(block, 0)

    def teardown(self) -> None:
        for holder in self.holders:
            self.alloc.free(holder)
        self.alloc.check_invariants()
        assert self.alloc.stats().num_in_use == 0, "blocks leaked after every holder let go"


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
