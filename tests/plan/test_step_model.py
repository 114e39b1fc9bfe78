"""Step costers: the roofline agrees with the cost model; the measured model fits what it was fitted to."""

from __future__ import annotations

import random

import pytest

from hetpd.plan.cost import decode_step_time, prefill_time
from hetpd.plan.spec import load_catalog
from hetpd.core.step_work import StepWork
from hetpd.plan.step_model import MeasuredSteps, RooflineSteps, fit_steps

CATALOG = load_catalog()
H100 = CATALOG.accelerator("nvidia_h100_sxm")
LLAMA8 = CATALOG.model("llama_3_1_8b")
TRUE = MeasuredSteps(overhead=0.004, weights=0.045, prefill_token=0.0025, decode_seq=0.0015, prefill_pair=1.5e-6,
                     decode_context=2e-5)


def grid() -> list[StepWork]:
    works = [StepWork(n, StepWork.chunk_pairs(0, n)) for n in (16, 64, 128, 256, 512)]
    works += [StepWork(0, 0, b, b * c) for b in (1, 2, 4, 8, 16) for c in (64, 320)]
    works += [StepWork(128, StepWork.chunk_pairs(0, 128), b, b * 200) for b in (1, 4, 16)]
    return works


def test_the_roofline_prices_pure_prefill_and_decode_as_the_cost_model_does() -> None:
    roofline = RooflineSteps(LLAMA8, H100, "bf16", "bf16", "bf16")
    assert roofline.seconds(StepWork(4096, StepWork.chunk_pairs(0, 4096))) == pytest.approx(
        prefill_time(LLAMA8, H100, "bf16", "bf16", [4096]).seconds)
    assert roofline.seconds(StepWork(0, 0, 3, 3000)) == pytest.approx(
        decode_step_time(LLAMA8, H100, "bf16", "bf16", "bf16", [1000, 1000, 1000]).seconds)
    mixed = roofline.seconds(StepWork(512, StepWork.chunk_pairs(0, 512), 8, 8000))
    assert mixed > roofline.seconds(StepWork(512, StepWork.chunk_pairs(0, 512)))  # decodes beside a chunk cost


def test_chunk_pairs_count_causal_attention() -> None:
    assert StepWork.chunk_pairs(0, 4) == 1 + 2 + 3 + 4
    assert StepWork.chunk_pairs(10, 2) == 11 + 12  # a later chunk attends to everything before it


def test_the_fit_recovers_a_known_step_model() -> None:
    samples = [(w, TRUE.seconds(w)) for w in grid()]
    fit = fit_steps(samples)
    assert fit.worst_error < 0.02
    for w in grid():
        assert fit.model.seconds(w) == pytest.approx(TRUE.seconds(w), rel=0.02)


def test_the_fit_tolerates_noise() -> None:
    rng = random.Random(0)
    samples = [(w, TRUE.seconds(w) * rng.uniform(0.9, 1.1)) for w in grid() for _ in range(3)]
    fit = fit_steps(samples)
    assert fit.median_error < 0.06
    assert fit.model.seconds(StepWork(300, StepWork.chunk_pairs(0, 300))) == pytest.approx(
        TRUE.seconds(StepWork(300, StepWork.chunk_pairs(0, 300))), rel=0.1)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        fit_steps([(StepWork(1), 0.1)])
    with pytest.raises(ValueError, match="positive"):
        fit_steps([(w, 0.0) for w in grid()])
    with pytest.raises(ValueError, match="non-negative"):
        MeasuredSteps(-1.0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="needs exactly the terms"):
        MeasuredSteps.from_dict({"overhead": 1.0})
    assert MeasuredSteps.from_dict(TRUE.as_dict()) == TRUE
