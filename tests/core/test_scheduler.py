"""Scheduler: admission by free blocks, chunked prefill, preemption by recompute, prefix reuse."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetpd.core.block_allocator import BlockAllocator
from hetpd.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from hetpd.core.sequence import Sequence, SequenceStatus


def make(num_blocks: int = 16, block_size: int = 4, max_seqs: int = 8, budget: int = 16, cache: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget), BlockAllocator(num_blocks, block_size, cache))


def seq(seq_id: str, prompt: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, list(prompt), len(prompt), max_tokens)


def fake_tokens(output: SchedulerOutput) -> dict[str, int]:
    """Deterministic 'model': next token = number of tokens so far (keeps prefixes comparable)."""
    return {c.seq.seq_id: c.seq.num_tokens % 97 for c in output.chunks if c.samples}


def check_ownership(sched: Scheduler) -> None:
    """Every in-use block's reference count equals the number of running sequences holding it."""
    sched.allocator.check_invariants()
    holders = Counter(b for s in sched.running for b in s.block_table)
    for block in range(sched.allocator.num_blocks):
        assert sched.allocator.ref_count(block) == holders.get(block, 0), f"block {block}"
    for s in sched.running:
        assert len(s.block_table) * sched.allocator.block_size >= s.num_computed_tokens
        assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"
    for s in sched.waiting:
        assert not s.block_table


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outputs = []
    for _ in range(max_steps):
        if not sched.has_work:
            return outputs
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        sched.on_step_done(out, fake_tokens(out))
        for s in list(sched.running):
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s)
        check_ownership(sched)
        outputs.append(out)
    raise AssertionError("scheduler did not finish its work (livelock)")


def test_long_prompt_is_chunked_under_the_token_budget() -> None:
    sched = make(budget=8)
    sched.add(seq("a", list(range(20))))
    out = run_to_completion(sched)
    prefill_chunks = [c.num_tokens for o in out for c in o.chunks if c.start < 20]
    assert prefill_chunks == [8, 8, 4]


def test_decode_and_prefill_share_a_step() -> None:
    sched = make(budget=8)
    sched.add(seq("a", [1, 2], max_tokens=5))
    first = sched.schedule()
    sched.on_step_done(first, fake_tokens(first))
    sched.add(seq("b", list(range(30))))
    second = sched.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in second.chunks] == [("a", 1), ("b", 7)]


def test_admission_waits_for_free_blocks() -> None:
    sched = make(num_blocks=4, block_size=4, budget=64)
    sched.add(seq("a", list(range(12)), max_tokens=4))  # 3 blocks
    sched.add(seq("b", list(range(100, 108)), max_tokens=4))  # 2 blocks: does not fit beside a
    out = sched.schedule()
    assert [c.seq.seq_id for c in out.chunks] == ["a"]
    assert [s.seq_id for s in sched.waiting] == ["b"]


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    sched = make(num_blocks=6, block_size=2, budget=64)
    for name in "abc":
        sched.add(seq(name, [ord(name)] * 3, max_tokens=6))
    outputs = run_to_completion(sched)
    preempted = [s.seq_id for o in outputs for s in o.preempted]
    assert preempted, "the pool is too small for three sequences: someone must be preempted"
    assert sched.allocator.stats().num_in_use == 0


def test_finished_prefix_is_reused_by_the_next_request() -> None:
    sched = make(block_size=4)
    prompt = list(range(10))
    sched.add(seq("a", prompt, max_tokens=1))
    run_to_completion(sched)
    b = seq("b", prompt + [50, 51])
    sched.add(b)
    out = sched.schedule()
    assert b.num_cached_prompt_tokens == 8
    assert out.chunks[0].start == 8 and out.chunks[0].num_tokens == 4


def test_request_larger_than_the_pool_is_refused() -> None:
    sched = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="more than the whole pool"):
        sched.add(seq("a", list(range(7)), max_tokens=4))
    assert not sched.has_work


def test_finish_with_keep_blocks_hands_ownership_to_the_caller() -> None:
    sched = make()
    s = seq("a", list(range(6)), max_tokens=4)
    sched.add(s)
    out = sched.schedule()
    sched.on_step_done(out, fake_tokens(out))
    blocks = sched.finish(s, keep_blocks=True)
    assert s.status is SequenceStatus.FINISHED and blocks
    assert all(sched.allocator.ref_count(b) == 1 for b in blocks)
    sched.allocator.free(blocks)
    assert sched.allocator.stats().num_in_use == 0


@settings(max_examples=80, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=10),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(1, 48),
    max_seqs=st.integers(1, 6),
    cache=st.booleans(),
)
def test_random_workloads_finish_without_leaks(
    prompts: list[tuple[int, int, int]], num_blocks: int, block_size: int, budget: int, max_seqs: int, cache: bool
) -> None:
    sched = make(num_blocks, block_size, max_seqs, budget, cache)
    accepted = []
    for i, (family, length, max_tokens) in enumerate(prompts):
        # Sequences of one family share a prefix, so the prefix cache gets exercised.
        s = seq(str(i), [family] * min(length, 8) + list(range(100 + i, 100 + i + max(0, length - 8))), max_tokens)
        try:
            sched.add(s)
            accepted.append(s)
        except ValueError:
            assert block_size * num_blocks < length + max_tokens
    run_to_completion(sched)
    assert all(s.num_output_tokens == s.max_tokens for s in accepted)
    assert all(s.status is SequenceStatus.FINISHED for s in accepted)
    assert sched.allocator.stats().num_in_use == 0
