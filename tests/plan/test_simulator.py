"""The simulator runs the runtime's scheduler, allocator and leases under simulated time."""

from __future__ import annotations

import pytest

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec, build_requests, parse_workload
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


def local_pair(**changes: object) -> SimConfig:
    """1P1D with measured steps: a prompt token costs 10 ms (10 tokens: 0.1 s, 100: 1 s), a decode
    step 70 ms at any batch size, so the step boundaries are easy to reason about; prompts chunk
    at 100 tokens."""
    from dataclasses import replace

    from hetpd.plan.step_model import MeasuredSteps

    steps = MeasuredSteps(overhead=0.0, weights=0.07, prefill_token=0.01, decode_seq=1e-6, prefill_pair=0.0,
                          decode_context=0.0)
    prefill = PoolSpec(H100, 1, max_batch_tokens=100, steps=steps)
    decode = PoolSpec(H100, 1, steps=steps)
    return replace(SimConfig(LLAMA8, prefill, decode, CATALOG.link("nvlink4_hopper")), **changes)  # type: ignore[arg-type]


PAIR_REQUESTS = [RequestSpec(0, 0.0, 10, 40),  # decodes from ~0.1 s on, one 70 ms step after another
                 RequestSpec(1, 0.05, 100, 20),  # prefilled 0.1-1.1 s
                 RequestSpec(2, 0.06, 10, 20)]  # prefilled 1.1-1.2 s


def test_lease_messages_wait_for_the_receiving_worker_to_finish_its_step() -> None:
    at_once = simulate(local_pair(), PAIR_REQUESTS).requests
    between = simulate(local_pair(control_at_step_boundaries=True), PAIR_REQUESTS).requests
    # At once: each handoff starts when its prompt's step ends.
    for times in at_once:
        assert times.handoff_start == pytest.approx(times.first_token)
    # Between steps: request 1's offer waits for the decode worker's step to end, and the grant then
    # waits for the prefill worker's step on request 2: the KV leaves when request 2's prompt is done.
    r0, r1, r2 = between
    assert r0.handoff_start == pytest.approx(r0.first_token)  # both workers were idle
    assert r1.first_token == pytest.approx(1.1) and r2.first_token == pytest.approx(1.2)
    assert r1.handoff_start == pytest.approx(r2.first_token)
    # Request 2's offer reaches a decode worker mid-step: at most one 70 ms step later it is granted.
    assert r2.first_token < r2.handoff_start <= r2.first_token + 0.07 + 1e-9
    assert all(t.finished is not None for t in between)
    # With any latency on the control path (the router's hop), request 0's grant comes back after
    # the prefill worker started request 1's 1 s prompt: the KV waits for that step to end.
    late = simulate(local_pair(control_at_step_boundaries=True, control_latency_s=0.002), PAIR_REQUESTS).requests
    assert late[0].handoff_start == pytest.approx(late[1].first_token) == pytest.approx(1.1)
    assert late[0].tpot > between[0].tpot


def test_instances_sharing_a_host_slow_each_other_only_while_both_are_busy() -> None:
    from dataclasses import replace

    alone = [RequestSpec(0, 0.0, 10, 40)]
    plain, slowed = (simulate(local_pair(decode=replace(local_pair().decode, interference=f)), alone)
                     for f in (0.0, 0.5))
    assert slowed.tpot.p50 == pytest.approx(plain.tpot.p50)  # the prefill worker idles while it decodes

    plain, slowed = (simulate(local_pair(decode=replace(local_pair().decode, interference=f)), PAIR_REQUESTS)
                     for f in (0.0, 0.5))
    # Request 0 decodes 0.1-2.9 s; the prefill worker is busy until 1.2 s: the steps that start then
    # run 1.5x as long (105 ms), the rest 70 ms.
    assert plain.requests[0].tpot == pytest.approx(0.07, rel=0.05)
    assert 0.07 * 1.05 < slowed.requests[0].tpot < 0.07 * 1.5
    assert slowed.requests[0].ttft == plain.requests[0].ttft  # the prefill pool's own steps are not slowed


def test_the_worker_loop_delays_the_next_step_not_this_steps_tokens() -> None:
    from dataclasses import replace

    from hetpd.plan.step_model import LoopCost

    pair = local_pair()
    plain = simulate(pair, PAIR_REQUESTS).requests
    looped = simulate(replace(pair, prefill=replace(pair.prefill, loop=LoopCost(per_step=0.05)),
                              decode=replace(pair.decode, loop=LoopCost(per_decode_seq=0.01))), PAIR_REQUESTS)
    times = looped.requests
    # Request 0's prompt step ends at 0.1 s and its token leaves then; the loop holds the prefill
    # worker until 0.15 s, so request 1's 1 s prompt ends at 1.15 s and request 2's at 1.3 s.
    assert (plain[0].first_token, times[0].first_token) == (pytest.approx(0.1), pytest.approx(0.1))
    assert plain[1].first_token == pytest.approx(1.1) and times[1].first_token == pytest.approx(1.15)
    assert plain[2].first_token == pytest.approx(1.2) and times[2].first_token == pytest.approx(1.3)
    # A request decoding alone: 70 ms steps plus 10 ms of loop for its one sequence.
    alone = [RequestSpec(0, 0.0, 10, 40)]
    assert simulate(pair, alone).tpot.p50 == pytest.approx(0.07, rel=0.01)
    assert simulate(replace(pair, decode=replace(pair.decode, loop=LoopCost(per_decode_seq=0.01))),
                    alone).tpot.p50 == pytest.approx(0.08, rel=0.01)
    # The loop is busy time: three prompt steps (1.2 s of engine time) and three loops of 50 ms.
    assert looped.prefill_utilisation * looped.duration_s == pytest.approx(1.2 + 3 * 0.05)


def test_the_fast_simulator_refuses_what_it_does_not_model() -> None:
    from dataclasses import replace

    from hetpd.plan.fastsim import simulate_fast
    from hetpd.plan.step_model import LoopCost

    for config in (local_pair(control_at_step_boundaries=True), local_pair(control_latency_s=0.001),
                   local_pair(prefill=replace(local_pair().prefill, interference=0.1)),
                   local_pair(decode=replace(local_pair().decode, loop=LoopCost(per_step=0.001)))):
        with pytest.raises(ValueError, match="--exact-simulator"):
            simulate_fast(config, PAIR_REQUESTS)
