"""The binding constraint and the coupling matrix, found by relieving one axis at a time."""

from __future__ import annotations

import pytest

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import build_requests, parse_workload
from hetpd.plan.explain import AXES, explain
from hetpd.plan.simulator import PoolSpec, SimConfig
from hetpd.plan.spec import load_catalog

CATALOG = load_catalog()
H100 = CATALOG.accelerator("nvidia_h100_sxm")
LLAMA8 = CATALOG.model("llama_3_1_8b")


def requests(rate: float, inputs: list[int], outputs: list[int]) -> list:  # type: ignore[type-arg]
    return build_requests(parse_workload({"arrival": {"kind": "poisson", "rate": rate}, "num_requests": 120,
                                          "lengths": {"kind": "uniform", "input": inputs, "output": outputs}}))


def test_a_slow_link_is_the_binding_constraint() -> None:
    config = SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 1), CATALOG.link("tcp_25gbe"), wire_fmt="bf16")
    why = explain(config, requests(8.0, [2048, 4096], [16, 32]), SLO(ttft=1.0, tpot=0.1))
    assert why.binding == "link", why.gains
    assert set(why.coupling) == set(AXES) and all(why.coupling[a][a] == 0.0 for a in AXES)


def test_long_prompts_at_a_high_rate_bind_on_prefill_compute() -> None:
    config = SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 2), CATALOG.link("nvlink4_hopper"))
    why = explain(config, requests(40.0, [6000, 8000], [8, 16]), SLO(ttft=1.0, tpot=0.1))
    assert why.binding == "prefill compute", why.gains


def test_reliefs_that_change_nothing_are_not_simulated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import hetpd.plan.explain as module

    calls: list[SimConfig] = []
    real = module.run_simulator
    monkeypatch.setattr(module, "run_simulator", lambda config, *a: calls.append(config) or real(config, *a))
    config = SimConfig(LLAMA8, PoolSpec(H100, 1), PoolSpec(H100, 1), CATALOG.link("roce_400g"))  # nothing converts
    work = requests(4.0, [512, 1024], [8, 16])
    full = explain(config, work, SLO(ttft=1.0, tpot=0.1))
    # the base, 4 axes (conversion is a no-op), 6 pairs without conversion; the 4 pairs with it are single reliefs
    assert len(calls) == 1 + 4 + 6 and full.gains["conversion"] == 0.0
    assert all(full.coupling is not None and full.coupling["conversion"][a] == 0.0 for a in AXES)
    calls.clear()
    single = explain(config, work, SLO(ttft=1.0, tpot=0.1), base=full.goodput, coupling=False)
    assert len(calls) == 4 and single.coupling is None and single.gains == full.gains


def test_gains_are_written_largest_first_with_their_sign() -> None:
    from hetpd.plan.explain import gains_text

    assert gains_text({"link": -0.001, "decode bandwidth": 0.126, "conversion": -0.2}) == \
        "decode bandwidth +13%, link +0%, conversion -20%"
