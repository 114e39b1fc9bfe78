"""The plan report: latency distributions of the top placements, and a fleet the catalog lists partly."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetpd.bench.workload import build_requests
from hetpd.plan.report import LATENCIES, draw, latency_cdf, peak_in
from hetpd.plan.scenario import parse_scenario
from hetpd.plan.search import plan
from hetpd.plan.simulator import RequestTimes
from hetpd.plan.spec import load_catalog


def test_latency_cdfs_cover_the_requests_that_have_the_latency() -> None:
    times = (RequestTimes(1.0, first_token=1.5, last_token=2.5, num_tokens=3, finished=2.5),
             RequestTimes(2.0, first_token=2.1, last_token=2.1, num_tokens=1, finished=2.1),
             RequestTimes(3.0))  # never served
    assert latency_cdf(times, LATENCIES["TTFT"]) == ([pytest.approx(100.0), pytest.approx(500.0)], [0.5, 1.0])
    assert latency_cdf(times, LATENCIES["TPOT"]) == ([pytest.approx(500.0)], [1.0])
    assert latency_cdf(times, LATENCIES["end-to-end latency"]) == ([pytest.approx(100.0), pytest.approx(1500.0)],
                                                                    [0.5, 1.0])


def test_the_report_draws_a_fleet_with_an_accelerator_listed_in_fp8_only(tmp_path: Path) -> None:
    catalog = load_catalog()
    assert peak_in(catalog.accelerator("metax_c600"), "bf16") == ("fp8", 1000.0)
    assert peak_in(catalog.accelerator("nvidia_h100_sxm"), "bf16") == ("bf16", 989.4)
    scenario = parse_scenario({
        "model": "llama_3_1_8b", "link": "roce_400g",
        "fleet": [{"accelerator": "metax_c600", "count": 2}, {"accelerator": "nvidia_h100_sxm", "count": 2}],
        "workload": {"arrival": {"kind": "poisson", "rate": 8}, "num_requests": 20,
                     "lengths": {"kind": "uniform", "input": [256, 1024], "output": [8, 32]}},
        "search": {"weight_formats": ["fp8"], "kv_formats": ["fp8"], "wire_formats": ["fp8"],
                   "max_instances_per_pool": 1}})
    result = plan(scenario, catalog, keep=3)
    fleet = [catalog.accelerator(f.accelerator) for f in scenario.fleet]
    png = draw(result, fleet, catalog.model("llama_3_1_8b"), build_requests(scenario.workload), None, tmp_path)
    assert png.stat().st_size > 50_000
