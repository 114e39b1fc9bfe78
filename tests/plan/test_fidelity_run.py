"""The simulator, calibrated by `hetpd profile`, predicts a real `hetpd serve` measured by `hetpd bench`.

A reduced version of benchmarks/fidelity.py (which runs colocated and 1P1D at three loads with
60 requests each and holds TTFT and TPOT medians to 15%, goodput to 10%): one prefill and one
decode worker, one medium load, 12 requests, a quick profile, and the step models refitted to two
calibration loads of 12 requests each (0.6 and 0.9 of capacity) the deployment served first.
Twelve requests make a median that moves by a request's worth, so the bounds here are wider; a simulator off by a factor
(a wrong step model, a missing handoff, queueing in the wrong place) still fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetpd.plan.fidelity_run import FidelityConfig, run_fidelity


@pytest.mark.timeout(900)
def test_the_simulator_predicts_a_real_1p1d_deployment(tmp_path: Path) -> None:
    config = FidelityConfig(modes=("1P1D",), num_requests=12, loads=(0.5,), quick_profile=True)
    [mode] = run_fidelity(config, tmp_path, log=lambda message: None)
    [point] = mode.points
    assert mode.capacity > 0 and point.measured_ttft_p50 > 0
    assert point.ttft_error < 0.35, point.row()
    assert point.tpot_error < 0.35, point.row()
    assert point.goodput_error < 0.25, point.row()
    # The step models were refitted to a calibration load the workers served (their step traces),
    # and the load point's served steps cost about what those models say.
    [ratios] = mode.step_ratios
    assert set(ratios) == {"prefill", "decode"}
    assert all(0.7 < r < 1.4 for r in ratios.values()), ratios
    assert (tmp_path / "calibration-1P1D-decode.yaml").exists()
    # Each traced step carries its work, its times, and the loop's own work around it.
    [trace] = (tmp_path / "steps-1P1D").glob("decode-*.jsonl")
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert steps and all(s["wall"] > 0 and s["cpu"] > 0 and s["before"] >= 0 and s["after"] >= 0 for s in steps)
    assert sum(s["work"][2] for s in steps) > 0  # decode steps decoded
