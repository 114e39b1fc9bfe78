"""StepWork: the four numbers a scheduled step's work is priced by, read off the scheduler's output."""

from __future__ import annotations

from hetpd.core.block_allocator import BlockAllocator
from hetpd.core.scheduler import Scheduler, SchedulerConfig
from hetpd.core.sequence import Sequence
from hetpd.core.step_work import StepWork, step_work


def test_chunk_pairs_count_causal_query_key_pairs() -> None:
    assert StepWork.chunk_pairs(0, 1) == 1
    assert StepWork.chunk_pairs(0, 4) == 1 + 2 + 3 + 4
    # A chunk continuing after 10 computed tokens sees them all, plus itself causally.
    assert StepWork.chunk_pairs(10, 3) == 11 + 12 + 13


def test_prompts_then_decodes_then_a_chunked_prompt_beside_decodes() -> None:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), BlockAllocator(64, 4, False))
    scheduler.add(Sequence("a", list(range(1, 11)), 10, 8))
    scheduler.add(Sequence("b", list(range(1, 21)), 20, 8))
    first = scheduler.schedule()
    assert step_work(first) == StepWork(30, StepWork.chunk_pairs(0, 10) + StepWork.chunk_pairs(0, 20), 0, 0)
    scheduler.on_step_done(first, {"a": 7, "b": 7})

    second = scheduler.schedule()  # each decodes its 11th / 21st token, attending to all before it
    assert step_work(second) == StepWork(0, 0, 2, 11 + 21)
    scheduler.on_step_done(second, {"a": 7, "b": 7})

    scheduler.add(Sequence("c", list(range(1, 41)), 40, 8))  # 40 tokens: 30 fit beside the 2 decodes
    third = scheduler.schedule()
    assert step_work(third) == StepWork(30, StepWork.chunk_pairs(0, 30), 2, 12 + 22)
    scheduler.on_step_done(third, {"a": 7, "b": 7})
    fourth = scheduler.schedule()  # c's last 10 prompt tokens are prefill work, not a decode
    assert step_work(fourth) == StepWork(10, StepWork.chunk_pairs(30, 10), 2, 13 + 23)
