"""How `hetpd serve` shares a host's cores among its local workers."""

from __future__ import annotations

from hetpd.serve.launcher import worker_threads


def test_the_router_keeps_a_core_and_workers_share_the_rest() -> None:
    assert worker_threads(1, cpus=2) == 1  # a colocated worker does not take the router's core
    assert worker_threads(2, cpus=2) == 1  # never below one thread
    assert worker_threads(2, cpus=16) == 7
    assert worker_threads(3, cpus=1) == 1
