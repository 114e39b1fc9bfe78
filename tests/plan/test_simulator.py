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


def test_a_colocated_deployment_serves_whole_requests_on_one_pool() -> None:
    from dataclasses import replace

    requests = workload(4.0, 60)
    colocated = replace(config(), colocated=True, prefill=PoolSpec(H100, 2, kv_pool_tokens=200_000))
    sim = _Simulation(colocated, requests, None)
    sim.run_until(3600)
    assert not sim.decode and all(t.finished is not None and t.handoff_start is None for t in sim.times.values())
    assert all(t.num_tokens == r.output_tokens for t, r in zip(sim.times.values(), requests, strict=True))
    for instance in sim.prefill:
        assert instance.allocator.num_available() == instance.allocator.num_blocks
    assert sim.ledger.snapshot().peak_total_bytes == 0  # no handoff: nothing held twice
    result = simulate(colocated, requests)
    assert result.link_utilisation == 0 and result.decode_utilisation == 0 and result.e2e.count == 60
    assert result.e2e.p50 > result.ttft.p50


def test_measured_step_times_replace_the_roofline() -> None:
    from dataclasses import replace

    from hetpd.plan.step_model import MeasuredSteps

    slow = MeasuredSteps(overhead=0.01, weights=0.05, prefill_token=0.001, decode_seq=0.001, prefill_pair=0.0,
                         decode_context=0.0)
    requests = workload(0.2, 20)  # light: no queueing, so latencies are step times
    result = simulate(replace(config(), prefill=PoolSpec(H100, 1, steps=slow),
                              decode=PoolSpec(H100, 1, kv_pool_tokens=400_000, steps=slow)), requests)
    first = min(requests, key=lambda r: r.at or 0.0)
    assert result.requests[first.index].ttft == pytest.approx(0.01 + max(0.05, 0.001 * first.input_tokens))
    assert result.tpot.p50 == pytest.approx(0.06, rel=0.05)  # one or two decoders: the 50 ms floor + overhead


def test_a_small_kv_pool_preempts_and_still_finishes() -> None:
    from dataclasses import replace

    requests = workload(50.0, 60)  # a burst into a decode pool of a few sequences' worth
    tight = replace(config(decode_tokens=6_000), decode=PoolSpec(H100, 1, kv_pool_tokens=6_000))
    sim = _Simulation(tight, requests, None)
    sim.run_until(3600)
    assert all(t.finished is not None for t in sim.times.values())
    assert sim.preemptions > 0 or sim.retries > 0
    for instance in sim.prefill + sim.decode:
        assert instance.allocator.num_available() == instance.allocator.num_blocks
