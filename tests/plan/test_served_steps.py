"""The step model refitted to what a deployment served: its own steps, and how workers sharing a
host slow each other (interference)."""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path

import pytest
import yaml

from hetpd.core.step_work import StepWork
from hetpd.plan.profile import load_steps
from hetpd.plan.profile import main as profile_main
from hetpd.plan.served_steps import (
    ServedCosts,
    ServedStep,
    fit_loop,
    load_served_costs,
    refit,
    served_steps,
)
from hetpd.plan.step_model import LoopCost, MeasuredSteps

TRUTH = MeasuredSteps(0.02, 0.0, 0.002, 0.001, 1e-6, 1e-5)


def calibration_file(path: Path, truth: MeasuredSteps = TRUTH) -> Path:
    """A calibration file as `hetpd profile` writes it, its steps priced exactly by ``truth``."""
    works = [StepWork(n, StepWork.chunk_pairs(0, n)) for n in (16, 64, 128, 256, 512)]
    works += [StepWork(0, 0, b, b * c) for b in (1, 2, 4, 8, 16) for c in (64, 320)]
    works += [StepWork(128, StepWork.chunk_pairs(0, 128), b, b * 64) for b in (1, 4, 16)]
    path.write_text(yaml.safe_dump({
        "step_model": {"threads": 1, "neighbours": 0, "median_error": 0.0, "terms": truth.as_dict()},
        "measurements": {"steps": [{"work": list(astuple(w)), "seconds": truth.seconds(w)} for w in works]}}))
    return path


def trace(path: Path, steps: list[tuple[float, StepWork, float]], loop: LoopCost = LoopCost()) -> None:
    """A worker's step trace as `hetpd serve --step-trace` writes it: (start, work, seconds) per step,
    the loop's time around each step as ``loop`` prices it, a third before and the rest after."""
    path.write_text("".join(json.dumps({"at": at, "wall": s, "cpu": s, "work": list(astuple(w)),
                                        "before": loop.seconds(w) / 3, "after": 2 * loop.seconds(w) / 3}) + "\n"
                            for at, w, s in steps))


def decode_steps(start: float, count: int, slower: float = 1.0) -> list[tuple[float, StepWork, float]]:
    steps, at = [], start
    for i in range(count):
        work = StepWork(0, 0, 1 + i % 5, (1 + i % 5) * (100 + 3 * i))
        seconds = slower * TRUTH.seconds(work)
        steps.append((at, work, seconds))
        at += seconds + 0.001
    return steps


def test_served_steps_pull_the_refitted_model_toward_what_serving_costs(tmp_path: Path) -> None:
    calibration = calibration_file(tmp_path / "calibration.yaml")
    traces = tmp_path / "steps"
    traces.mkdir()
    # One worker alone whose served steps cost 30% more than the profile said (its loop, streaming).
    trace(traces / "decode-0.jsonl", decode_steps(0.0, 120, slower=1.3))
    steps = served_steps(traces, "decode-")
    assert len(steps) == 120 and not any(s.beside_busy for s in steps)

    out = tmp_path / "refitted.yaml"
    refitted = refit(calibration, steps, out)
    model = load_steps(str(out))
    assert model == refitted.fit.model and (refitted.alone, refitted.beside, refitted.interference) == (120, 0, 0.0)
    assert yaml.safe_load(out.read_text())["step_model"]["served_steps"] == 120
    ratio = sum(model.seconds(s.work) for s in steps) / sum(TRUTH.seconds(s.work) for s in steps)
    assert 1.2 < ratio < 1.35, ratio  # the served steps outnumber the profile's, and they cost 1.3x
    # The profile's own file is untouched; the CLI refits the same way.
    assert load_steps(str(calibration)) == TRUTH
    assert profile_main(["--calibration", str(calibration), "--served-steps", str(traces), "--workers", "decode-",
                         "--out", str(tmp_path / "cli.yaml")]) == 0
    assert load_steps(str(tmp_path / "cli.yaml")) == model


def test_steps_beside_a_busy_worker_measure_the_interference(tmp_path: Path) -> None:
    calibration = calibration_file(tmp_path / "calibration.yaml")
    traces = tmp_path / "steps"
    traces.mkdir()
    # Decode runs 0-20 s at profile speed; a prefill worker is mid-step over 5-10 s, and the
    # decode steps that start then run 25% longer.
    decodes = [(at, w, s * (1.25 if 5.0 <= at < 10.0 else 1.0)) for at, w, s in decode_steps(0.0, 400)]
    trace(traces / "decode-0.jsonl", decodes)
    trace(traces / "prefill-0.jsonl", [(5.0 + i, StepWork(300, StepWork.chunk_pairs(0, 300)), 0.999) for i in range(5)])
    steps = served_steps(traces, "decode-")
    assert {s.beside_busy for s in steps} == {True, False}
    assert all(s.beside_busy == (5.0 <= at < 9.999) for s, (at, _, _) in zip(steps, decodes, strict=True))

    refitted = refit(calibration, steps, tmp_path / "decode.yaml")
    assert refitted.interference == pytest.approx(0.25, abs=0.03)
    assert load_served_costs(tmp_path / "decode.yaml").interference == refitted.interference
    assert load_served_costs(calibration) == ServedCosts()  # never refitted: nothing added
    # The alone steps cost what the profile said, so the model stays the profile's.
    assert refitted.fit.median_error < 0.01


def test_the_loop_around_each_step_is_fitted_and_written_with_the_calibration(tmp_path: Path) -> None:
    calibration = calibration_file(tmp_path / "calibration.yaml")
    traces = tmp_path / "steps"
    traces.mkdir()
    truth = LoopCost(per_step=0.002, per_prompt_token=2e-5, per_decode_seq=3e-4)
    prompts = [(100.0 + i, StepWork(n, StepWork.chunk_pairs(0, n)), TRUTH.seconds(StepWork(n, StepWork.chunk_pairs(0, n))))
               for i, n in enumerate((40, 90, 150, 220, 256, 64, 128))]
    trace(traces / "colocated-0.jsonl", decode_steps(0.0, 60) + prompts, truth)
    steps = served_steps(traces)
    assert sum(s.loop for s in steps) == pytest.approx(sum(truth.seconds(s.work) for s in steps))
    refitted = refit(calibration, steps, tmp_path / "colocated.yaml")
    assert refitted.loop.per_step == pytest.approx(truth.per_step, rel=1e-6)
    assert refitted.loop.per_prompt_token == pytest.approx(truth.per_prompt_token, rel=1e-6)
    assert refitted.loop.per_decode_seq == pytest.approx(truth.per_decode_seq, rel=1e-6)
    assert load_served_costs(tmp_path / "colocated.yaml") == ServedCosts(0.0, refitted.loop)
    assert "us per prompt token" in refitted.summary()


def test_a_loop_term_the_data_cannot_support_is_dropped_not_negative() -> None:
    # Loop time that falls with the batch: a negative per-sequence term would price big batches
    # below nothing; the fit drops it and keeps the mean in the constant.
    served = [ServedStep("d-0", StepWork(0, 0, b, 64 * b), 0.05, False, 0.004 - 0.0002 * b) for b in range(1, 11)]
    loop = fit_loop(served)
    assert loop.per_decode_seq == 0.0 and loop.per_prompt_token == 0.0
    assert loop.per_step == pytest.approx(sum(s.loop for s in served) / len(served))
    assert fit_loop([]) == LoopCost()
    with pytest.raises(ValueError, match="non-negative"):
        LoopCost(per_step=-1.0)


def test_no_served_steps_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--step-trace"):
        served_steps(tmp_path, "decode-")
    (tmp_path / "empty.yaml").write_text("step_model: {}\n")
    with pytest.raises(ValueError, match="measurements.steps"):
        refit(tmp_path / "empty.yaml", [], tmp_path / "out.yaml")
