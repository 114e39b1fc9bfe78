"""A calibration prices the pools on the machine it profiled, its step model only the profiled model
in the profiled format; every other accelerator keeps the catalog defaults."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from hetpd.bench.workload import RequestSpec, build_requests
from hetpd.core.step_work import StepWork
from hetpd.plan.calibrated import (
    SHAPE_FIELDS,
    Calibrated,
    PoolCalibration,
    load_calibrated,
    shape_of,
)
from hetpd.plan.cost import Efficiency
from hetpd.plan.scenario import parse_scenario
from hetpd.plan.search import Candidate, Evaluation, build_config, plan
from hetpd.plan.simulator import simulate
from hetpd.plan.spec import ModelShape, load_catalog
from hetpd.plan.step_model import MeasuredSteps

STEPS = MeasuredSteps(0.01, 0.02, 1e-4, 1e-4, 1e-8, 1e-7)
TINY = {"id": "tiny", "layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab_size": 256, "params_total_b": 0.0001, "params_active_b": 0.0001,
        "confidence": "high", "sources": ["the test"]}


def calibration(path: Path, **step_model: Any) -> Path:
    """A calibration as `hetpd profile` writes it (the parts the planner reads)."""
    local = {"id": "local", "name": "this machine", "vendor": "local", "peak_tflops": {"fp32": 0.1},
             "memory_gb": 16.0, "memory_tbps": 0.02, "confidence": "high", "sources": ["measured by hetpd profile"]}
    terms = {"threads": 1, "neighbours": 0, "median_error": 0.05, "terms": STEPS.as_dict(), **step_model}
    path.write_text(yaml.safe_dump({"accelerators": [local], "efficiency": {"compute": 0.9, "memory": 0.3},
                                    "step_model": terms}))
    return path


def test_the_step_model_applies_only_to_the_profiled_machine_model_and_format(tmp_path: Path) -> None:
    tiny = ModelShape(**{k: v for k, v in TINY.items() if k != "sources"})
    calibrated = load_calibrated(calibration(tmp_path / "c.yaml", model=shape_of(tiny), format="fp32"))
    assert calibrated.for_pool("local", tiny, "fp32") == PoolCalibration(Efficiency(0.9, 0.3), STEPS)
    # Another format or model on the same machine: its efficiencies, the roofline's steps.
    assert calibrated.for_pool("local", tiny, "bf16") == PoolCalibration(Efficiency(0.9, 0.3), None)
    assert calibrated.for_pool("local", replace(tiny, layers=3), "fp32").steps is None
    # Another accelerator (a tensor-parallel pair of the machine included): nothing from this file.
    assert calibrated.for_pool("nvidia_h100_sxm", tiny, "fp32") == PoolCalibration()
    assert calibrated.for_pool("localx2", tiny, "fp32") == PoolCalibration()


def test_a_calibration_that_does_not_say_what_it_measured_gives_only_efficiencies(tmp_path: Path) -> None:
    calibrated = load_calibrated(calibration(tmp_path / "old.yaml"))
    assert calibrated == Calibrated("local", Efficiency(0.9, 0.3))
    (tmp_path / "bad.yaml").write_text("step_model: {}\n")
    with pytest.raises(ValueError, match="efficiency"):
        load_calibrated(tmp_path / "bad.yaml")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"efficiency": {"compute": 1, "memory": 1},
                                                       "accelerators": [{"id": "a"}, {"id": "b"}]}))
    with pytest.raises(ValueError, match="exactly one accelerator"):
        load_calibrated(tmp_path / "two.yaml")


def test_the_planner_prices_the_profiled_machine_by_its_calibration_and_the_rest_by_the_catalog(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [TINY]}))
    path = calibration(tmp_path / "calibration.yaml", model={k: TINY[k] for k in SHAPE_FIELDS}, format="fp32")
    raw = {"model": "tiny", "catalog": [str(models)], "calibration": str(path), "link": "roce_400g",
           "fleet": [{"accelerator": "local", "count": 1}, {"accelerator": "nvidia_h100_sxm", "count": 2}],
           "workload": {"arrival": {"kind": "poisson", "rate": 2}, "num_requests": 20,
                        "lengths": {"kind": "fixed", "input": 128, "output": 16}},
           "search": {"weight_formats": ["fp32", "bf16"], "kv_formats": ["bf16"], "wire_formats": ["bf16"],
                      "max_instances_per_pool": 1}}
    scenario = parse_scenario(raw)
    catalog = load_catalog([models, path])
    model = catalog.model("tiny")
    requests = build_requests(scenario.workload)
    candidate = Candidate("local", 1, "nvidia_h100_sxm", 1, "fp32", "bf16", "bf16", "bf16")
    built = build_config(candidate, scenario, catalog, model, requests, load_calibrated(path))
    assert not isinstance(built, Evaluation), built
    config, _ = built
    assert config.prefill.steps == STEPS and config.prefill.efficiency == Efficiency(0.9, 0.3)
    assert config.decode.steps is None and config.decode.efficiency is None  # the H100: catalog defaults
    # The simulated prefill pool's steps take what the measured model says: the first token of a
    # lone 128-token prompt comes after one prompt step.
    alone = simulate(config, [RequestSpec(0, 0.0, 128, 16)])
    assert alone.ttft.p50 == pytest.approx(STEPS.seconds(StepWork(128, StepWork.chunk_pairs(0, 128))))
    # Planned with and without the calibration: placements on the H100 alone predict the same.
    both = plan(scenario, catalog, prune=False)
    plain = plan(parse_scenario({**raw, "calibration": None}), catalog, prune=False)
    on_h100 = {e.candidate: e.result for e in plain.ranked if "local" not in (e.candidate.prefill, e.candidate.decode)}
    assert on_h100
    compared = 0
    for e in both.ranked:
        if e.candidate in on_h100:
            assert e.result is not None and on_h100[e.candidate] is not None
            assert e.result.ttft.p50 == on_h100[e.candidate].ttft.p50
            compared += 1
    assert compared == len(on_h100)
    # ... and the placement with the local prefill pool predicts differently with its calibration.
    local = {e.candidate: e.result for e in plain.ranked}
    calibrated_local = next(e.result for e in both.ranked if e.candidate == candidate)
    assert calibrated_local is not None and local[candidate] is not None
    assert calibrated_local.ttft.p50 != local[candidate].ttft.p50
