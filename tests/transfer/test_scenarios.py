"""The scenarios every cross-process backend must pass, each against a real peer process."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
from transfer import harness

BACKENDS = [
    "shm",
    "tcp",
    pytest.param("nixl", marks=pytest.mark.skipif(importlib.util.find_spec("nixl") is None,
                                                  reason="nixl is not installed (pip install nixl==1.5.1)")),
]
SCENARIOS: list[Callable[[str], None]] = [
    harness.round_trip_many_spans,  # many scattered spans in several posts
    harness.checksum_mismatch_fails,  # corrupted after hashing: FAILED, names the span
    harness.cancel_drops_late_data,  # after cancel returns, late data never lands
    harness.sender_killed_fails_promptly,
    harness.receiver_killed_fails_promptly,
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scenario(backend: str, scenario: Callable[[str], None]) -> None:
    scenario(backend)
