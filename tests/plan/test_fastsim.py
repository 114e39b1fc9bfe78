"""The fast simulator against the exact one: the same requests, the same decisions, the same times."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import fields, replace

import pytest

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec, build_requests, parse_workload
from hetpd.core.step_work import StepWork
from hetpd.plan.fastsim import (
    _SEGMENT,
    DecodeCurve,
    _Engine,
    _Simulation,
    decode_curve,
    simulate_fast,
)
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult, simulate
from hetpd.plan.spec import load_catalog
from hetpd.plan.step_model import MeasuredSteps, RooflineSteps

CATALOG = load_catalog()
H100 = CATALOG.accelerator("nvidia_h100_sxm")
LLAMA8 = CATALOG.model("llama_3_1_8b")
SLOS = SLO(ttft=0.5, tpot=0.03)
MEASURED = MeasuredSteps(overhead=0.002, weights=0.008, prefill_token=2e-5, decode_seq=3e-5, prefill_pair=1e-9,
                         decode_context=2e-8)
# Agreement: both simulators make the same decisions, so each request's times agree up to float
# rounding (closed-form sums of step times instead of one addition a step: ~1e-13 s here).
TIME_TOLERANCE = 1e-6


def workload(rate: float, n: int, seed: int = 0) -> list[RequestSpec]:
    return build_requests(parse_workload({"arrival": {"kind": "poisson", "rate": rate}, "num_requests": n, "seed": seed,
                                          "lengths": {"kind": "uniform", "input": [256, 2048], "output": [16, 128]}}))


def config(link: str = "nvlink4_hopper", prefill: int = 1, decode: int = 1, decode_tokens: int = 400_000) -> SimConfig:
    return SimConfig(LLAMA8, PoolSpec(H100, prefill), PoolSpec(H100, decode, kv_pool_tokens=decode_tokens),
                     CATALOG.link(link))


CASES: dict[str, tuple[SimConfig, list[RequestSpec]]] = {
    "light": (config(), workload(1.0, 100)),
    "medium": (config(prefill=2, decode=2), workload(15.0, 300)),
    "heavy": (config(prefill=2, decode=2), workload(40.0, 300)),
    "slow link": (config("tcp_25gbe"), workload(4.0, 300)),
    "small decode pool": (config(decode_tokens=8_000), workload(20.0, 150)),
    "colocated": (replace(config(), colocated=True, prefill=PoolSpec(H100, 2, kv_pool_tokens=200_000)),
                  workload(6.0, 200)),
    "colocated, small pool": (replace(config(), colocated=True, prefill=PoolSpec(H100, 1, kv_pool_tokens=6_000)),
                              workload(12.0, 120)),
    "measured steps": (replace(config(), prefill=PoolSpec(H100, 1, steps=MEASURED),
                               decode=PoolSpec(H100, 2, kv_pool_tokens=100_000, steps=MEASURED)), workload(8.0, 300)),
    "measured steps, slow batch sizes": (
        replace(config(), prefill=PoolSpec(H100, 1, steps=MEASURED),
                decode=PoolSpec(H100, 2, kv_pool_tokens=100_000,
                                steps=replace(MEASURED, decode_batch_factor=(1.0, 1.3, 0.9, 1.0, 1.2, 1.0, 1.0, 1.4)))),
        workload(8.0, 300)),
    "burst at t=0": (config(prefill=2, decode=2, decode_tokens=30_000),
                     [replace(r, at=None) for r in workload(1.0, 80, seed=3)]),
}


def assert_same(exact: SimResult, fast: SimResult) -> None:
    """Per request: the same first, last and finish times (to rounding) and token counts; the
    same counters; the summary numbers to rounding."""
    assert len(exact.requests) == len(fast.requests)
    for index, (e, f) in enumerate(zip(exact.requests, fast.requests, strict=True)):
        assert e.num_tokens == f.num_tokens, index
        for name in ("arrival", "first_token", "last_token", "finished", "handoff_start", "handoff_end"):
            a, b = getattr(e, name), getattr(f, name)
            assert (a is None) == (b is None), (index, name)
            if a is not None and b is not None:
                assert b == pytest.approx(a, abs=TIME_TOLERANCE), (index, name)
    assert (fast.retries, fast.preemptions, fast.peak_transient_bytes, fast.binding) == \
           (exact.retries, exact.preemptions, exact.peak_transient_bytes, exact.binding)
    for name in ("ttft", "tpot", "e2e"):
        e_dist, f_dist = getattr(exact, name), getattr(fast, name)
        assert f_dist.count == e_dist.count
        assert f_dist.p50 == pytest.approx(e_dist.p50, rel=1e-9, nan_ok=True)
        assert f_dist.p99 == pytest.approx(e_dist.p99, rel=1e-9, nan_ok=True)
    for name in ("duration_s", "goodput", "throughput", "prefill_utilisation", "decode_utilisation",
                 "link_utilisation"):
        assert getattr(fast, name) == pytest.approx(getattr(exact, name), rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("name", list(CASES))
def test_the_fast_simulator_agrees_with_the_exact_one(name: str) -> None:
    deployment, requests = CASES[name]
    exact = simulate(deployment, requests, SLOS)
    fast = simulate_fast(deployment, requests, SLOS)
    assert_same(exact, fast)
    assert all(t.finished is not None for t in fast.requests)
    if name in ("small decode pool",):
        assert fast.retries > 0 and fast.preemptions > 0  # the case exercises refusals and preemption
    if name == "colocated, small pool":
        assert fast.preemptions > 0
    if name == "slow link":
        assert fast.link_utilisation > 0.5


def test_a_lone_long_request_costs_a_few_events_not_one_per_token() -> None:
    requests = [RequestSpec(0, 0.0, 1000, 4000)]
    sim = _Simulation(config(), requests)
    sim.run(3600.0)
    times = sim.times[0]
    assert times.num_tokens == 4000 and times.finished is not None
    assert sim.counter < 40  # 3,999 decode steps in a handful of lockstep segments (one per page-alignment change)
    exact = simulate(config(), requests)
    assert times.finished == pytest.approx(exact.requests[0].finished, abs=TIME_TOLERANCE)


def checked_run(deployment: SimConfig, requests: list[RequestSpec], monkeypatch: pytest.MonkeyPatch) -> _Simulation:
    """Run with the page books checked after every instance event: never negative, never above
    the pool, and free pages at any moment never above those at the anchor."""
    wake: Callable[[_Engine, float, int], None] = _Engine.wake

    def checking_wake(engine: _Engine, now: float, version: int) -> None:
        wake(engine, now, version)
        for other in engine.sim.engines:
            assert 0 <= other.free_at(now) <= other.free <= other.num_blocks
            assert len(other.running) >= other.batch >= 0 and other.context >= 0

    monkeypatch.setattr(_Engine, "wake", checking_wake)
    sim = _Simulation(deployment, requests)
    sim.run(3600.0)
    return sim


@pytest.mark.parametrize("name", ["heavy", "small decode pool", "colocated, small pool", "slow link"])
def test_every_request_finishes_and_every_page_comes_back(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, requests = CASES[name]
    sim = checked_run(deployment, requests, monkeypatch)
    assert all(t.finished is not None for t in sim.times)
    # A refused handoff is prefilled again, but its first token was streamed already: counted once.
    assert sum(t.num_tokens for t in sim.times) == sum(r.output_tokens for r in requests)
    for engine in sim.engines:
        assert engine.free == engine.num_blocks
        assert not engine.running and not engine.waiting and not engine.prefilling and engine.batch == 0
    assert sim.transient == 0 and not sim.held and not sim.refused


def test_random_deployments_agree_with_the_exact_simulator() -> None:
    """Small random deployments and workloads: tiny pools, budgets below the batch, page sizes,
    both step models, slow links, colocated. Every one must agree request by request."""
    rng = random.Random(7)
    compared = 0
    for _ in range(60):
        deployment, requests = random_case(rng)
        try:
            exact = simulate(deployment, requests, SLOS)
        except ValueError as error:  # a request larger than a whole prefill pool
            with pytest.raises(ValueError) as fast_error:
                simulate_fast(deployment, requests, SLOS)
            assert str(fast_error.value) == str(error)
            continue
        assert_same(exact, simulate_fast(deployment, requests, SLOS))
        compared += 1
    assert compared >= 50


def random_case(rng: random.Random) -> tuple[SimConfig, list[RequestSpec]]:
    def pool(count: int) -> PoolSpec:
        steps = MeasuredSteps(rng.uniform(0, 0.003), rng.uniform(0, 0.01), rng.uniform(0, 5e-5), rng.uniform(0, 5e-5),
                              rng.uniform(0, 1e-8), rng.uniform(0, 5e-8)) if rng.random() < 0.3 else None
        return PoolSpec(H100, count, kv_pool_tokens=rng.choice([3_000, 8_000, 30_000, 200_000]),
                        max_num_seqs=rng.choice([8, 64, 256]), max_batch_tokens=rng.choice([4, 64, 512, 8192]),
                        steps=steps)

    model = CATALOG.model(rng.choice(["llama_3_1_8b", "mixtral_8x7b"]))
    deployment = SimConfig(model, pool(rng.randint(1, 3)), pool(rng.randint(1, 3)),
                           CATALOG.link(rng.choice(["nvlink4_hopper", "tcp_25gbe", "roce_400g"])),
                           page_tokens=rng.choice([4, 16, 32]), colocated=rng.random() < 0.3,
                           handoff_overhead_s=rng.choice([0.0, 0.001]))
    rate, at, requests = rng.choice([0.5, 5.0, 30.0, 200.0]), 0.0, []
    for index in range(rng.randint(1, 80)):
        at += rng.expovariate(rate)
        requests.append(RequestSpec(index, at, rng.randint(1, rng.choice([50, 600, 3000])),
                                    rng.randint(0, rng.choice([3, 60, 300]))))
    return deployment, requests


def test_the_horizon_cuts_both_alike() -> None:
    deployment, requests = CASES["small decode pool"]
    exact = simulate(deployment, requests, SLOS, horizon_s=3.0)
    fast = simulate_fast(deployment, requests, SLOS, horizon_s=3.0)
    done = [t.finished is not None for t in exact.requests]
    assert 0 < sum(done) < len(requests) and done == [t.finished is not None for t in fast.requests]
    assert fast.goodput == pytest.approx(exact.goodput) and fast.ttft.p50 == pytest.approx(exact.ttft.p50)


# ---------------------------------------------------------------------- the step-time curve
@pytest.mark.parametrize("model", ["llama_3_1_8b", "mixtral_8x7b"])
@pytest.mark.parametrize("batch", [1, 3, 4, 64, 256])
def test_the_decode_curve_is_the_coster(model: str, batch: int) -> None:
    roofline = RooflineSteps(CATALOG.model(model), H100, "bf16", "bf16", "bf16")
    for coster in (roofline, MEASURED):
        curve = decode_curve(coster, batch)
        for context in (batch, 1_000, 37_000, 300_000, 3_000_000, 50_000_000):
            assert curve.at(context) == pytest.approx(coster.seconds(StepWork(0, 0, batch, context)), rel=1e-9)


def test_the_roofline_curve_turns_from_compute_to_memory() -> None:
    curve = decode_curve(RooflineSteps(LLAMA8, H100, "bf16", "bf16", "bf16"), 256)
    assert 0 < curve.split < math.inf and curve.high_b > curve.low_b  # memory (KV reads) grows faster
    assert curve.split_step(0, 256) == math.ceil(curve.split / 256) and curve.split_step(int(curve.split) + 1, 256) == 0
    assert DecodeCurve(1.0, 0.0, 1.0, 0.0, math.inf).split_step(0, 8) > 10**15


def test_a_segment_sums_and_inverts_its_step_times() -> None:
    """The closed-form time of k lockstep steps, and the step in progress at a time, against
    adding the coster's step times one by one."""
    deployment = config()
    sim = _Simulation(deployment, [])
    engine = sim.decode[0]
    batch = 1024  # compute-bound at first, memory-bound once the context has grown
    engine.seg_curve = curve = decode_curve(RooflineSteps(LLAMA8, H100, "bf16", "bf16", "bf16"), batch)
    engine.batch, engine.context, engine.t0, engine.seg_n = batch, 40_000, 5.0, 3_000
    engine.seg_split = curve.split_step(engine.context, batch)
    engine.seg_before_split = sum(curve.at(engine.context + i * batch) for i in range(engine.seg_split))
    assert 0 < engine.seg_split < engine.seg_n
    starts = [5.0]
    for i in range(engine.seg_n):
        starts.append(starts[-1] + curve.at(engine.context + i * batch))
    for k in (0, 1, 17, engine.seg_split, engine.seg_split + 1, engine.seg_n):
        assert 5.0 + engine._elapsed(k) == pytest.approx(starts[k], rel=1e-12)
    engine.state = _SEGMENT
    for k in (0, 1, 17, engine.seg_split - 1, engine.seg_split, 2_999):
        middle = (starts[k] + starts[k + 1]) / 2
        assert engine._steps_started(middle) == k + 1
    assert engine._steps_started(4.0) == 0 and engine._steps_started(starts[-1] + 10) == engine.seg_n


# ---------------------------------------------------------------------- inputs simulate rejects or accepts
def test_no_requests_give_the_same_empty_result() -> None:
    exact, fast = simulate(config(), []), simulate_fast(config(), [])
    for field in fields(SimResult):
        a, b = getattr(exact, field.name), getattr(fast, field.name)
        assert a == b or repr(a) == repr(b), field.name  # NaN percentiles compare by repr


@pytest.mark.parametrize("request_spec", [RequestSpec(0, 0.0, 0, 5), RequestSpec(0, 0.0, 300_000, 5)])
def test_impossible_requests_raise_as_in_simulate(request_spec: RequestSpec) -> None:
    with pytest.raises(ValueError) as exact:
        simulate(config(), [request_spec])
    with pytest.raises(ValueError) as fast:
        simulate_fast(config(), [request_spec])
    assert str(fast.value) == str(exact.value)


def test_requests_of_at_most_one_token_finish_at_prefill() -> None:
    requests = [RequestSpec(0, None, 10, 0), RequestSpec(1, 0.0, 100, 1), RequestSpec(2, 0.5, 30, 2)]
    assert_same(simulate(config(), requests), simulate_fast(config(), requests))
    assert simulate_fast(config(), requests).requests[0].handoff_start is None


@pytest.mark.parametrize("requests", [[], workload(1.0, 3)])
def test_a_prefill_pool_without_instances_fails_in_both(requests: list[RequestSpec]) -> None:
    deployment = replace(config(), prefill=PoolSpec(H100, 0))
    for run in (simulate, simulate_fast):
        with pytest.raises(ValueError, match="prefill.count: a deployment needs at least one instance"):
            run(deployment, requests)


def test_a_decode_pool_without_instances_is_refused_up_front_by_both() -> None:
    deployment, requests = replace(config(), decode=PoolSpec(H100, 0)), workload(1.0, 3)
    for run in (simulate, simulate_fast):
        with pytest.raises(ValueError, match="decode.count"):
            run(deployment, requests)
