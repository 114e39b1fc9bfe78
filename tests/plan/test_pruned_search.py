"""The pruned search is exact: its table and Pareto frontier equal brute force over the simulator,
because the goodput bound it prunes by is never below a simulated goodput."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from hetpd.bench.workload import build_requests
from hetpd.plan.bound import GoodputBound, horizon_for
from hetpd.plan.scenario import parse_scenario
from hetpd.plan.search import Evaluation, PlanResult, build_config, plan, scenario_slo
from hetpd.plan.spec import load_catalog

CATALOG = load_catalog()

SPACES: dict[str, dict[str, Any]] = {
    # Three accelerator types, 8B, a load one H100 cannot prefill alone: saturated single-instance prefill
    # (the queueing bound), decode too slow for the TPOT SLO (zero goodput), fp8 and int8 weights that
    # simulate identically on an H100 (ties), and a Pareto frontier of several points.
    "mixed": {
        "name": "mixed", "model": "llama_3_1_8b",
        "fleet": [{"accelerator": "nvidia_h100_sxm", "count": 4}, {"accelerator": "nvidia_a100_80gb_sxm", "count": 2},
                  {"accelerator": "nvidia_l40s", "count": 2}],
        "link": "roce_400g",
        "workload": {"arrival": {"kind": "poisson", "rate": 60}, "num_requests": 40,
                     "lengths": {"kind": "uniform", "input": [256, 4096], "output": [8, 64]}},
        "slo": {"ttft_ms": 600, "tpot_ms": 12},
        "search": {"weight_formats": ["fp8", "int8"], "kv_formats": ["fp8"], "wire_formats": ["fp8"],
                   "max_instances_per_pool": 2},
    },
    # A slow link: handoffs queue behind each other and hold the prefill side's pages.
    "slow link": {
        "name": "slow-link", "model": "llama_3_1_8b", "fleet": [{"accelerator": "nvidia_h100_sxm", "count": 2}],
        "link": "tcp_25gbe",
        "workload": {"arrival": {"kind": "poisson", "rate": 6}, "num_requests": 60,
                     "lengths": {"kind": "uniform", "input": [2048, 4096], "output": [8, 32]}},
        "slo": {"ttft_ms": 2000, "tpot_ms": 60},
        "search": {"weight_formats": ["bf16"], "kv_formats": ["bf16", "fp8"], "wire_formats": ["bf16", "fp8", "int4"],
                   "max_instances_per_pool": 1},
    },
}


@functools.cache
def searched(space: str, rank_by: str, keep: int, prune: bool, exact: bool = False) -> PlanResult:
    return plan(parse_scenario(SPACES[space]), CATALOG, rank_by=rank_by, keep=keep, prune=prune, exact=exact)


def brute_force(space: str, rank_by: str, exact: bool = False) -> PlanResult:
    return searched(space, rank_by, 1, False, exact)  # keep does not matter without pruning


def rows(evaluations: tuple[Evaluation, ...]) -> list[tuple[str, float]]:
    return [(e.candidate.describe(), e.goodput) for e in evaluations]


@pytest.mark.parametrize("space,rank_by", [("mixed", "accelerator"), ("mixed", "power"), ("slow link", "accelerator"),
                                           ("slow link", "cost")])
@pytest.mark.parametrize("keep", [1, 5])
def test_the_pruned_search_equals_brute_force(space: str, rank_by: str, keep: int) -> None:
    exact, pruned = brute_force(space, rank_by), searched(space, rank_by, keep, True)
    assert rows(pruned.ranked[:keep]) == rows(exact.ranked[:keep])
    assert pruned.ranked[0].candidate == exact.ranked[0].candidate
    assert rows(pruned.pareto) == rows(exact.pareto)
    assert rows(pruned.rejected) == rows(exact.rejected)
    assert {e.candidate for e in exact.ranked} == {e.candidate for e in pruned.ranked} | {p.candidate for p in pruned.pruned}
    assert pruned.simulated + len(pruned.pruned) == exact.simulated


def test_the_search_prunes_most_of_a_space_it_can_bound() -> None:
    exact, pruned = brute_force("mixed", "accelerator"), searched("mixed", "accelerator", 5, True)
    assert len(exact.pareto) >= 3 and any(e.goodput == 0 for e in exact.ranked)
    assert len(pruned.pruned) > exact.simulated / 2, (pruned.simulated, len(pruned.pruned))
    for p in pruned.pruned:  # each skipped one is provably below the 5th row and dominated on the frontier
        assert p.bound / p.accelerators <= pruned.ranked[4].goodput_per_accelerator
        assert any(e.goodput >= p.bound and e.accelerators <= p.accelerators for e in pruned.ranked)


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("exact", [False, True], ids=["fast simulator", "exact simulator"])
def test_the_bound_is_never_below_the_simulated_goodput(space: str, exact: bool) -> None:
    scenario = parse_scenario(SPACES[space])
    model, requests, slo = CATALOG.model(scenario.model), build_requests(scenario.workload), scenario_slo(scenario)
    bound = GoodputBound(requests, slo, horizon_for(requests))
    everything = brute_force(space, "accelerator", exact).ranked
    tight = 0
    for e in everything:
        built = build_config(e.candidate, scenario, CATALOG, model, requests)
        assert not isinstance(built, Evaluation)
        ceiling = bound(built[0])
        assert ceiling >= e.goodput, (e.candidate.describe(), ceiling, e.goodput)
        tight += ceiling <= 1.5 * e.goodput + 0.01
    assert tight >= len(everything) / 3  # a bound, not just a large number


def test_a_bound_below_the_goodput_would_change_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The equality above has teeth: halve the bound (no longer valid) and the pruned search
    loses the brute-force answer."""
    honest = GoodputBound.__call__
    monkeypatch.setattr(GoodputBound, "__call__", lambda self, config: 0.5 * honest(self, config))
    broken = plan(parse_scenario(SPACES["mixed"]), CATALOG, keep=5)
    exact = brute_force("mixed", "accelerator")
    assert rows(broken.ranked[:5]) != rows(exact.ranked[:5]) or rows(broken.pareto) != rows(exact.pareto)
