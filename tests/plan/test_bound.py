"""The goodput bound: its pieces never exceed what the simulator charges, and it binds where it should."""

from __future__ import annotations

import dataclasses
import random

import pytest

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec, build_requests, parse_workload
from hetpd.core.step_work import StepWork
from hetpd.plan.bound import GoodputBound, charged_goodput, horizon_for, step_floors
from hetpd.plan.simulator import PoolSpec, RequestTimes, SimConfig, simulate
from hetpd.plan.spec import ModelShape, load_catalog
from hetpd.plan.step_model import MeasuredSteps, RooflineSteps

CATALOG = load_catalog()
H100 = CATALOG.accelerator("nvidia_h100_sxm")
A100 = CATALOG.accelerator("nvidia_a100_80gb_sxm")
LLAMA8, LLAMA70, MIXTRAL = CATALOG.model("llama_3_1_8b"), CATALOG.model("llama_3_1_70b"), CATALOG.model("mixtral_8x7b")
LINK = CATALOG.link("nvlink4_hopper")


def workload(rate: float, inputs: list[int], outputs: list[int], n: int = 60) -> list[RequestSpec]:
    return build_requests(parse_workload({"arrival": {"kind": "poisson", "rate": rate}, "num_requests": n,
                                          "lengths": {"kind": "uniform", "input": inputs, "output": outputs}}))


def checked(config: SimConfig, requests: list[RequestSpec], slo: SLO) -> tuple[float, float]:
    """(bound, goodput as the planner counts it); fails if the bound is below the goodput."""
    horizon = horizon_for(requests)
    goodput = charged_goodput(simulate(config, requests, slo, horizon_s=horizon), horizon)
    bound = GoodputBound(requests, slo, horizon)(config)
    assert bound >= goodput, (bound, goodput)
    return bound, goodput


@pytest.mark.parametrize("model,pool", [
    (LLAMA8, PoolSpec(H100, 1, "fp8", "fp8", "fp8")),
    (LLAMA70, PoolSpec(A100, 1, "bf16", "int8", "bf16")),
    (MIXTRAL, PoolSpec(H100, 1)),  # a MoE reads every expert for a prompt, only the active ones for a few decodes
    (LLAMA8, PoolSpec(H100, 1, steps=MeasuredSteps(0.002, 0.01, 1e-5, 2e-4, 1e-9, 1e-7))),
])
@pytest.mark.parametrize("prompts", [True, False])
def test_step_floors_never_exceed_the_step_price(model: ModelShape, pool: PoolSpec, prompts: bool) -> None:
    config = SimConfig(model, pool, pool, LINK)
    floors = step_floors(config, pool, prompts)
    assert floors is not None
    coster = pool.steps or RooflineSteps(model, pool.accelerator, pool.compute_fmt, pool.weight_fmt, pool.kv_fmt,
                                         config.efficiency)

    def floor(work: StepWork) -> float:
        return max(f.const + f.token * work.prefill_tokens + f.pair * work.prefill_pairs + f.seq * work.decode_seqs
                   + f.context * work.decode_context for f in floors)

    rng = random.Random(0)
    for _ in range(500):
        tokens = rng.choice([1, rng.randrange(1, 8192)] + ([] if prompts else [0, 0]))
        seqs = rng.choice([0, 1, 3, rng.randrange(1, 256)])
        work = StepWork(tokens, tokens * rng.randrange(1, 4096), seqs, seqs * rng.randrange(0, 8192))
        assert floor(work) <= coster.seconds(work) * (1 + 1e-12), work
    # Not vacuous: the least work a step of the pool does is priced at its floor.
    least = StepWork(1, 1, 0, 0) if prompts else StepWork(0, 0, 1, 1)
    assert floor(least) == pytest.approx(coster.seconds(least), rel=1e-9)


def test_a_lightly_loaded_deployment_is_bounded_closely() -> None:
    config = SimConfig(LLAMA8, PoolSpec(H100, 2), PoolSpec(H100, 2), LINK)
    bound, goodput = checked(config, workload(2.0, [256, 1024], [16, 64]), SLO(ttft=1.0, tpot=0.1))
    assert goodput > 0 and bound < 1.02 * goodput


def test_one_prefill_instance_that_cannot_keep_up_is_bounded_by_its_queue() -> None:
    requests = workload(40.0, [3000, 4000], [4, 8])
    slo = SLO(ttft=0.5, tpot=0.1)
    one = SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 2), LINK)
    bound, goodput = checked(one, requests, slo)
    # Without the queue, every request could meet the TTFT SLO; in arrival order most cannot.
    assert bound < 0.5 * len(requests) / max(r.at or 0.0 for r in requests)
    two = dataclasses.replace(one, prefill=dataclasses.replace(one.prefill, count=2))
    assert GoodputBound(requests, slo, horizon_for(requests))(two) > 2 * bound  # the queue argument needs one instance


def test_a_decode_pool_too_slow_for_the_tpot_slo_has_no_goodput() -> None:
    # 70B in int8 on an A100 reads 70 GB per decode step: ~43 ms at 80% of 2 TB/s, over a 30 ms TPOT SLO
    # (and long prompts: a retried prefill could not make up the average either).
    config = SimConfig(LLAMA70, PoolSpec(H100, 1, "fp8", "fp8"), PoolSpec(A100, 1, "int8", "int8", "int8"), LINK)
    bound, goodput = checked(config, workload(1.0, [2000, 4000], [8, 16], n=20), SLO(ttft=2.0, tpot=0.03))
    assert bound == 0.0 == goodput


def test_unfinished_requests_are_charged_the_horizon() -> None:
    requests = workload(2.0, [256, 1024], [16, 64], n=20)
    result = simulate(SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 1), LINK), requests, SLO(ttft=1.0, tpot=0.1))
    assert charged_goodput(result, 3600.0) == result.goodput > 0
    stuck = dataclasses.replace(result, requests=result.requests[:-1] + (RequestTimes(result.requests[-1].arrival),))
    meets = round(result.goodput * result.duration_s)
    assert charged_goodput(stuck, 3600.0) == meets / 3600.0
    assert horizon_for(requests) == 3600.0 + max(r.at or 0.0 for r in requests)


def test_deployments_the_argument_does_not_cover_are_not_bounded() -> None:
    requests = workload(2.0, [256, 1024], [16, 64], n=10)
    colocated = SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 1), LINK, colocated=True)
    assert GoodputBound(requests, SLO(), horizon_for(requests))(colocated) == float("inf")
