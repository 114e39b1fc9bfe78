"""The simulator runs the runtime's scheduler, allocator and leases under simulated time."""

from __future__ import annotations

import pytest

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import build_requests, parse_workload
from hetpd.plan.simulator import PoolSpec, SimConfig, _Simulation, simulate
from hetpd.plan.spec import load_catalog

CATALOG = load_catalog()
H100 = CATALOG.accelerator("nvidia_h100_sxm")
LLAMA8 = CATALOG.model("llama_3_1_8b")


def workload(rate: float, n: int = 120) -> list:  # type: ignore[type-arg]
    return build_requests(parse_workload({"arrival": {"kind": "poisson", "rate": rate}, "num_requests": n,
                                          "lengths": {"kind": "uniform", "input": [256, 2048], "output": [16, 128]}}))


def config(link: str = "nvlink4_hopper", wire: str = "bf16", decode_tokens: int = 400_000) -> SimConfig:
    return SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 1, kv_pool_tokens=decode_tokens),
                     CATALOG.link(link), wire_fmt=wire)


def test_every_request_finishes_and_nothing_leaks() -> None:
    requests = workload(5.0)
    sim = _Simulation(config(), requests, None)
    sim.run_until(3600)
    assert all(t.finished is not None for t in sim.times.values())
    for instance in sim.prefill + sim.decode:  # the real allocator: every page back
        assert instance.allocator.num_available() == instance.allocator.num_blocks
        instance.allocator.check_invariants()
    assert sim.producers.live() == 0 and sim.consumers.live() == 0  # the real leases: all ended
    assert sim.ledger.snapshot().total_bytes == 0 and sim.ledger.snapshot().peak_total_bytes > 0


def test_latencies_follow_the_cost_model() -> None:
    result = simulate(config(), workload(2.0), SLO(ttft=0.5, tpot=0.05))
    assert 0 < result.ttft.p50 < 0.5 and 0.004 < result.tpot.p50 < 0.05  # ~6 ms bandwidth-bound decode steps
    assert result.goodput > 0 and result.binding in ("prefill compute", "decode", "link")


def test_a_slow_link_binds_and_a_narrow_wire_format_helps() -> None:
    slow = simulate(config("tcp_25gbe"), workload(4.0))
    fast = simulate(config("nvlink4_hopper"), workload(4.0))
    narrow = simulate(config("tcp_25gbe", wire="fp8"), workload(4.0))
    assert slow.link_utilisation > 0.5 > 0.05 > fast.link_utilisation
    assert slow.tpot.p50 < 0.05  # decode itself is unaffected; the wait is before the first decode step
    mean_e2e = lambda r: sum((t.finished or 0) - t.arrival for t in r.requests) / len(r.requests)  # noqa: E731
    assert mean_e2e(fast) < mean_e2e(slow) and mean_e2e(narrow) < mean_e2e(slow)
    assert narrow.link_utilisation == pytest.approx(slow.link_utilisation / 2, rel=0.2)  # fp8: half the bytes


def test_a_small_decode_pool_refuses_handoffs_and_they_are_redone() -> None:
    result = simulate(config(decode_tokens=4096), workload(20.0, n=40))
    assert result.retries > 0 and all(t.finished is not None for t in result.requests)
