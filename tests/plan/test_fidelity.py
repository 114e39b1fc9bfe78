"""A deployment file as the simulator sees it, and the comparison of a prediction with a bench run."""

from __future__ import annotations

import math

import pytest

from hetpd.bench.metrics import SLO, Distribution, Summary
from hetpd.bench.workload import build_requests, parse_workload
from hetpd.plan.fidelity import Agreement, agreement, sim_config_for
from hetpd.plan.simulator import simulate
from hetpd.plan.spec import load_catalog
from hetpd.plan.step_model import MeasuredSteps
from hetpd.serve.deploy import parse_deployment

CATALOG = load_catalog()
ACC = CATALOG.accelerator("nvidia_h100_sxm")
SHAPE = CATALOG.model("llama_3_1_8b")
LINK = CATALOG.link("tcp_25gbe")
STEPS = MeasuredSteps(0.002, 0.05, 0.002, 0.001, 1e-6, 1e-5)


def test_a_disaggregated_deployment_maps_pool_for_pool() -> None:
    deploy = parse_deployment({"pools": [
        {"name": "p", "role": "prefill", "num_kv_blocks": 512, "block_size": 32, "max_num_batched_tokens": 1024},
        {"name": "d", "role": "decode", "count": 2, "kv_cache_dtype": "int8", "num_kv_blocks": 1024,
         "block_size": 32, "max_num_seqs": 8}]})
    config = sim_config_for(deploy, SHAPE, ACC, {"p": STEPS, "d": STEPS}, LINK)
    assert not config.colocated and config.page_tokens == 32 and config.wire_fmt == "int8"
    assert config.prefill.kv_pool_tokens == 512 * 32 and config.prefill.max_batch_tokens == 1024
    assert config.decode.count == 2 and config.decode.max_num_seqs == 8 and config.decode.kv_fmt == "int8"
    assert config.prefill.steps is STEPS


def test_a_colocated_deployment_simulates_without_a_handoff() -> None:
    deploy = parse_deployment({"pools": [{"name": "c", "role": "colocated", "num_kv_blocks": 4096}]})
    config = sim_config_for(deploy, SHAPE, ACC, {"c": STEPS}, LINK)
    assert config.colocated
    requests = build_requests(parse_workload({"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 10,
                                              "lengths": {"kind": "fixed", "input": 100, "output": 10}}))
    result = simulate(config, requests)
    assert result.ttft.count == 10 and result.link_utilisation == 0


def test_what_cannot_be_simulated_is_named() -> None:
    two = parse_deployment({"pools": [{"name": "p", "role": "prefill", "num_kv_blocks": 64},
                                      {"name": "d", "role": "decode"}]})
    with pytest.raises(ValueError, match="no measured step model for pools"):
        sim_config_for(two, SHAPE, ACC, {"p": STEPS}, LINK)
    with pytest.raises(ValueError, match="pools.d.num_kv_blocks"):
        sim_config_for(two, SHAPE, ACC, {"p": STEPS, "d": STEPS}, LINK)


def test_agreement_is_relative_to_what_was_measured() -> None:
    d = Distribution.of
    measured = Summary(10, 10, 10.0, 1.0, 20.0, 0.8, 0.8, d([0.2]), d([0.05]), d([0.05]), d([1.0]), d([0.0]))
    point = agreement("x", 1.0, measured, type("R", (), {"ttft": d([0.23]), "tpot": d([0.05]), "goodput": 0.7})())
    assert point.ttft_error == pytest.approx(0.15) and point.tpot_error == 0 and point.goodput_error == pytest.approx(0.125)
    assert not point.within() and point.within(latency=0.2, goodput=0.2)
    assert math.isinf(Agreement("x", 1, 0, 1, 1, 1, 1, 1).ttft_error)
    assert SLO().ttft == math.inf


def test_serving_overhead_lands_on_the_pool_that_pays_it() -> None:
    from hetpd.plan.fidelity_run import ServingOverhead

    two = parse_deployment({"pools": [{"name": "p", "role": "prefill", "num_kv_blocks": 64},
                                      {"name": "d", "role": "decode", "num_kv_blocks": 64}]})
    config = ServingOverhead(0.03, 0.01).applied(sim_config_for(two, SHAPE, ACC, {"p": STEPS, "d": STEPS}, LINK))
    assert config.prefill.steps is not None and config.decode.steps is not None
    assert config.prefill.steps.overhead == pytest.approx(STEPS.overhead + 0.03)
    assert config.decode.steps.overhead == pytest.approx(STEPS.overhead + 0.01)
    one = parse_deployment({"pools": [{"name": "c", "role": "colocated", "num_kv_blocks": 64}]})
    colocated = ServingOverhead(0.03, 0.01).applied(sim_config_for(one, SHAPE, ACC, {"c": STEPS}, LINK))
    assert colocated.prefill.steps is not None and colocated.prefill.steps.overhead == pytest.approx(STEPS.overhead + 0.01)
