"""hetpd profile measures this machine and the engine, and plans can use what it measured."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from hetpd.core.step_work import StepWork
from hetpd.plan.cost import load_efficiency
from hetpd.plan.profile import load_steps, profile, write
from hetpd.plan.scenario import parse_scenario
from hetpd.plan.search import plan
from hetpd.plan.spec import load_catalog


def test_profile_writes_a_calibration_the_planner_uses(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    calibration = profile(tiny_model_dir("llama"), quick=True, threads=1, log=lambda m: None)
    assert 0 < calibration.compute < 2 and 0 < calibration.memory < 2  # fractions of measured peaks
    assert calibration.accelerator["peak_tflops"]["fp32"] > 0 and calibration.accelerator["memory_tbps"] > 0
    path = tmp_path / "calibration.yaml"
    write(calibration, path)
    assert load_efficiency(str(path)).compute == calibration.compute
    catalog = load_catalog([path])  # the local machine joins the catalog as an accelerator
    assert catalog.accelerator("local").memory_gb > 1
    scenario = parse_scenario({
        "model": "llama_3_1_8b", "fleet": [{"accelerator": "nvidia_h100_sxm", "count": 2}], "link": "roce_400g",
        "calibration": str(path),
        "workload": {"arrival": {"kind": "poisson", "rate": 2}, "num_requests": 20,
                     "lengths": {"kind": "fixed", "input": 512, "output": 32}},
        "search": {"weight_formats": ["bf16"], "kv_formats": ["bf16"], "wire_formats": ["bf16"],
                   "max_instances_per_pool": 1}})
    calibrated = plan(scenario, catalog).ranked[0].result
    default = plan(parse_scenario({**scenario.model_dump(mode="json"), "calibration": None}), catalog).ranked[0].result
    assert calibrated is not None and default is not None
    assert calibrated.tpot.p50 != default.tpot.p50  # the measured efficiencies change the predicted step times
    assert yaml.safe_load(path.read_text())["measurements"]["decode_memory_efficiency"]
    # The step model is fitted to every measured step and predicts them; the transports join the catalog.
    steps = load_steps(str(path))
    measured = yaml.safe_load(path.read_text())["measurements"]["steps"]
    assert len(measured) >= 10 and calibration.threads == 1
    errors = sorted(abs(steps.seconds(StepWork(*m["work"])) - m["seconds"]) / m["seconds"] for m in measured)
    assert errors[len(errors) // 2] < 0.35  # a tiny model's steps are mostly overhead: noisy, but fitted
    assert catalog.link("local_shm").bandwidth > 0 and catalog.link("local_tcp").bandwidth > 0


def test_busy_neighbours_run_beside_the_measurements_and_are_gone_after(tiny_model_dir: Callable[[str], Path],
                                                                        tmp_path: Path) -> None:
    import subprocess

    calibration = profile(tiny_model_dir("llama"), quick=True, threads=1, transports=False, neighbours=1,
                          log=lambda m: None)
    assert calibration.neighbours == 1 and calibration.steps.seconds(StepWork(0, 0, 1, 64)) > 0
    path = tmp_path / "calibration.yaml"
    write(calibration, path)
    assert yaml.safe_load(path.read_text())["step_model"]["neighbours"] == 1
    left = subprocess.run(["pgrep", "-f", "neighbour_loop"], capture_output=True, text=True).stdout.split()
    assert not left, f"neighbour processes still running: {left}"

