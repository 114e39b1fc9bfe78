"""The placement search: capacity rejections with reasons, a ranking, a Pareto frontier, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hetpd.plan.scenario import ScenarioError, parse_scenario
from hetpd.plan.search import plan
from hetpd.plan.spec import load_catalog

SMALL: dict[str, Any] = {
    "name": "small", "model": "llama_3_1_70b",
    "fleet": [{"accelerator": "nvidia_h100_sxm", "count": 2}, {"accelerator": "nvidia_h200_sxm", "count": 2}],
    "link": "roce_400g",
    "workload": {"arrival": {"kind": "poisson", "rate": 4}, "num_requests": 30,
                 "lengths": {"kind": "uniform", "input": [256, 1024], "output": [16, 64]}},
    "slo": {"ttft_ms": 2000, "tpot_ms": 100},
    "search": {"weight_formats": ["bf16", "fp8"], "kv_formats": ["fp8"], "wire_formats": ["fp8"],
               "max_instances_per_pool": 1},
}


def test_the_search_ranks_fits_and_explains_rejections() -> None:
    result = plan(parse_scenario(SMALL), load_catalog(), keep=100)  # every fitting placement is in the table
    # 70B in bf16 (141 GB) fits neither an 80 GB H100 nor leaves room on a 141 GB H200: rejected, with the reason.
    assert any("capacity" in e.reason and e.candidate.prefill_weights == "bf16" for e in result.rejected)
    assert result.ranked and all(e.candidate.prefill_weights == "fp8" or e.candidate.prefill == "nvidia_h200_sxm"
                                 for e in result.ranked)
    per_accel = [e.goodput_per_accelerator for e in result.ranked]
    assert per_accel == sorted(per_accel, reverse=True)
    for e in result.pareto:
        assert not any(o.goodput > e.goodput and o.accelerators <= e.accelerators for o in result.ranked)
    best = result.ranked[0].result
    assert best is not None and best.ttft.count == 30 and best.binding in ("prefill compute", "decode", "link")
    assert not result.pruned and result.simulated == len(result.ranked)


def test_a_placement_the_catalog_cannot_price_is_rejected_with_the_reason() -> None:
    # The catalog lists the MetaX C600's fp8 throughput only: bf16 weights would run in bf16, which it has no figure for.
    scenario = parse_scenario({**SMALL, "model": "llama_3_1_8b", "fleet": [{"accelerator": "metax_c600", "count": 2}]})
    result = plan(scenario, load_catalog(), keep=100)
    assert result.ranked and all(e.candidate.prefill_weights == e.candidate.decode_weights == "fp8" for e in result.ranked)
    assert any(e.reason.startswith("prefill compute: the catalog gives metax_c600 no throughput for bf16")
               for e in result.rejected)


def test_bad_scenarios_name_the_field() -> None:
    with pytest.raises(ScenarioError, match="fleet.0.count"):
        parse_scenario({**SMALL, "fleet": [{"accelerator": "nvidia_h100_sxm", "count": 0}]})
    with pytest.raises(ScenarioError, match="search.wire_formats.0"):
        parse_scenario({**SMALL, "search": {"wire_formats": ["fp6"]}})


@pytest.mark.timeout(300)
def test_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "-m", "hetpd.cli", "plan", str(path), "--top", "3", "--json", str(out),
                           "--report", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    assert "pareto" in done.stdout and "rejected:" in done.stdout and "binding:" in done.stdout and out.exists()
    written = json.loads(out.read_text())
    search = written["search"]
    assert search["candidates"] == search["rejected"] + search["simulated"] + search["pruned"] > 0
    assert f"{search['simulated']} simulated, {search['pruned']} pruned" in done.stdout
    assert "candidates:" in done.stderr  # the progress bar
    assert len(written["ranked"]) == search["simulated"] and len(written["pruned"]) == search["pruned"]
    assert all(row["goodput_bound"] >= row["goodput"] for row in written["ranked"])
    assert [e["coupling"] is not None for e in written["explained"]] == [True] + [False] * (len(written["explained"]) - 1)
    assert (tmp_path / "report" / "plan.png").stat().st_size > 10_000 and (tmp_path / "report" / "plan.html").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SMALL, "link": "pigeon"}))
    done = subprocess.run([sys.executable, "-m", "hetpd.cli", "plan", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "unknown link 'pigeon'" in done.stderr


def test_tensor_parallelism_makes_a_big_model_fit() -> None:
    scenario = parse_scenario({**SMALL, "fleet": [{"accelerator": "nvidia_h100_sxm", "count": 4}],
                               "search": {**SMALL["search"], "weight_formats": ["bf16"], "max_tensor_parallel": 2}})
    result = plan(scenario, load_catalog())
    assert result.ranked and all(e.candidate.prefill_tp == 2 and e.candidate.decode_tp == 2 for e in result.ranked)
    assert all(e.accelerators == 4 for e in result.ranked)
    assert any(e.candidate.prefill_tp == 1 and "capacity" in e.reason for e in result.rejected)


def test_the_emitted_deployment_is_one_hetpd_serve_accepts() -> None:
    from hetpd.plan.emit import deployment_for
    from hetpd.plan.search import Candidate
    from hetpd.serve.deploy import parse_deployment

    catalog = load_catalog()
    exact = Candidate("nvidia_h100_sxm", 2, "nvidia_h200_sxm", 1, "bf16", "bf16", "fp8", "fp8")
    deploy, notes = deployment_for(exact, catalog, "roce_400g", "/models/llama")
    parsed = parse_deployment(deploy)
    assert [(p.role, p.count, p.kv_cache_dtype, p.transport) for p in parsed.pools] == [
        ("prefill", 2, "bfloat16", "tcp"), ("decode", 1, "fp8_e4m3", "tcp")]
    assert notes == []
    approximate = Candidate("amd_mi300x", 1, "nvidia_h100_sxm", 1, "fp8", "int8", "int4", "int4", 2, 1)
    deploy, notes = deployment_for(approximate, catalog, "nvlink4_hopper")
    parse_deployment(deploy)
    assert any("fp8 weights" in n for n in notes) and any("int4 KV" in n for n in notes)
    assert any("tensor parallel 2" in n for n in notes) and any("no AMD backend" in n for n in notes)


def test_ranking_per_dollar_and_per_kilowatt(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    base = load_catalog()
    entries = []
    for ident, price in (("nvidia_h100_sxm", 2.0), ("nvidia_h200_sxm", 6.0)):
        acc = base.accelerator(ident)
        entries.append({"id": acc.id, "name": acc.name, "vendor": acc.vendor, "peak_tflops": acc.peak_tflops,
                        "memory_gb": acc.memory_gb, "memory_tbps": acc.memory_tbps, "tdp_w": acc.tdp_w,
                        "price_per_hour": price, "confidence": "medium", "sources": ["our contract"]})
    prices.write_text(yaml.safe_dump({"accelerators": entries}))
    catalog = load_catalog([prices])
    scenario = parse_scenario({**SMALL, "model": "llama_3_1_8b"})
    by_cost = plan(scenario, catalog, rank_by="cost")
    per_dollar = [e.goodput / (e.cost_per_hour(catalog) or 1) for e in by_cost.ranked]
    assert per_dollar == sorted(per_dollar, reverse=True)
    by_power = plan(scenario, catalog, rank_by="power")
    per_kw = [e.goodput / (e.power_kw(catalog) or 1) for e in by_power.ranked]
    assert per_kw == sorted(per_kw, reverse=True)
    with pytest.raises(ValueError, match="rank_by 'luck'"):
        plan(scenario, catalog, rank_by="luck")
