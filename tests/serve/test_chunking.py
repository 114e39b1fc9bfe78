"""The prompt budget follows a latency target on the device it runs on."""

from __future__ import annotations

import pytest

from hetpd.serve.chunking import MIN_TOKENS, ChunkSizer


def device(tokens: int, context: int = 0) -> float:
    """A slow device: 5 ms per prompt token plus attention that grows with the context."""
    return 0.005 * tokens + 1e-6 * tokens * context + 0.002


def test_the_budget_converges_to_what_fits_the_target() -> None:
    sizer = ChunkSizer(target_s=0.5, max_tokens=2048)
    budget = sizer.budget
    for _ in range(12):
        budget = sizer.observe(budget, device(budget))
    assert 0.45 <= device(budget) <= 0.55  # ~99 tokens instead of 2048 (a 10 s step)


def test_long_contexts_shrink_the_budget_and_limits_hold() -> None:
    sizer = ChunkSizer(target_s=0.5, max_tokens=2048)
    for _ in range(12):
        sizer.observe(sizer.budget, device(sizer.budget))
    short = sizer.budget
    for _ in range(12):
        sizer.observe(sizer.budget, device(sizer.budget, context=4000))
    assert sizer.budget < short
    fast = ChunkSizer(target_s=10.0, max_tokens=512)
    assert fast.observe(512, 0.01) == 512  # never above the pool's max_num_batched_tokens
    slow = ChunkSizer(target_s=0.001, max_tokens=512)
    for _ in range(20):
        slow.observe(slow.budget, 1.0)
    assert slow.budget == MIN_TOKENS
    assert slow.observe(0, 1.0) == MIN_TOKENS  # a step with no prompt tokens says nothing


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="target_s"):
        ChunkSizer(0.0, 2048)
