"""hetpd profile measures this machine and the engine, and plans can use what it measured."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import yaml

from hetpd.core.step_work import StepWork
from hetpd.models.config import ModelConfig
from hetpd.plan.calibrated import load_calibrated
from hetpd.plan.profile import load_steps, profile, write
from hetpd.plan.spec import ModelShape, load_catalog


def test_profile_writes_a_calibration_the_planner_uses(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    calibration = profile(tiny_model_dir("llama"), quick=True, threads=1, log=lambda m: None)
    assert 0 < calibration.compute < 2 and 0 < calibration.memory < 2  # fractions of measured peaks
    assert calibration.accelerator["peak_tflops"]["fp32"] > 0 and calibration.accelerator["memory_tbps"] > 0
    path = tmp_path / "calibration.yaml"
    write(calibration, path)
    catalog = load_catalog([path])  # the local machine joins the catalog as an accelerator
    assert catalog.accelerator("local").memory_gb > 1
    # The file says what the step model measured: the planner prices that model, in that format,
    # on this machine with it, and anything else with the efficiencies.
    calibrated = load_calibrated(path)
    profiled = ModelShape.from_config(ModelConfig.from_dir(tiny_model_dir("llama")), "tiny")
    assert calibrated.efficiency.compute == calibration.compute
    assert calibrated.for_pool("local", profiled, "fp32").steps == load_steps(str(path))
    assert calibrated.for_pool("local", profiled, "bf16").steps is None
    assert yaml.safe_load(path.read_text())["measurements"]["decode_memory_efficiency"]
    # The step model is fitted to every measured step and predicts them; the transports join the catalog.
    steps = load_steps(str(path))
    measured = yaml.safe_load(path.read_text())["measurements"]["steps"]
    assert len(measured) >= 10 and calibration.threads == 1
    # A tiny model's steps take a millisecond or two, mostly overhead, and a quick profile measures
    # few of them: on a busy machine any one can be off by half. The fit must still follow them
    # better than their median does, and add up to what they took.
    seconds = [m["seconds"] for m in measured]
    typical = statistics.median(seconds)
    fitted = [steps.seconds(StepWork(*m["work"])) for m in measured]
    errors = sorted(abs(f - s) / s for f, s in zip(fitted, seconds, strict=True))
    flat = sorted(abs(typical - s) / s for s in seconds)
    assert errors[len(errors) // 2] < flat[len(flat) // 2]
    assert 0.8 < sum(fitted) / sum(seconds) < 1.25
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

