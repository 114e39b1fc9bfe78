"""Step costers: the roofline agrees with the cost model; the measured model fits what it was fitted to."""

from __future__ import annotations

import random

import pytest

from hetpd.core.step_work import StepWork
from hetpd.plan.cost import decode_step_time, prefill_time
from hetpd.plan.spec import load_catalog
from hetpd.plan.step_model import (
    MeasuredSteps,
    RooflineSteps,
    batch_factors,
    fit_steps,
    fit_steps_by_batch,
)

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


def test_a_slow_batch_size_gets_its_own_factor_and_does_not_tilt_the_line() -> None:
    # The engine's decode steps of 2 and of 8 sequences run 1.25x and 1.3x the line (a matmul
    # library's kernel choice by row count); every other batch size is on it.
    cliff = {2: 1.25, 8: 1.3}
    works = grid() + [StepWork(0, 0, b, b * 320) for b in range(1, 17) for _ in range(3)]
    samples = [(w, TRUE.seconds(w) * (cliff.get(w.decode_seqs, 1.0) if not w.prefill_tokens else 1.0))
               for w in works]
    fit = fit_steps_by_batch(samples)
    factors = fit.model.decode_batch_factor
    assert len(factors) == 16
    # (The line's weights floor is picked from the samples' own times, so it lands near, not on,
    # the true one: a few percent.)
    assert factors[1] == pytest.approx(1.25, rel=0.04) and factors[7] == pytest.approx(1.3, rel=0.04)
    assert all(f == pytest.approx(1.0, abs=0.04) for b, f in enumerate(factors, 1) if b not in cliff)
    assert fit.worst_error < 0.05 < fit_steps(samples).worst_error
    # Prompt steps and steps with prompt chunks are never scaled.
    assert fit.model.seconds(StepWork(128, StepWork.chunk_pairs(0, 128), 2, 400)) == pytest.approx(
        TRUE.seconds(StepWork(128, StepWork.chunk_pairs(0, 128), 2, 400)), rel=0.04)
    # For one batch size the step stays affine in its context (the fast simulator's closed form).
    at = [fit.model.seconds(StepWork(0, 0, 2, c)) for c in (0, 1000, 2000)]
    assert at[2] - at[1] == pytest.approx(at[1] - at[0])


def test_batch_factors_need_enough_steps_and_round_trip_through_a_file() -> None:
    few = [(StepWork(0, 0, 3, 300), 2 * TRUE.seconds(StepWork(0, 0, 3, 300)))] * 2
    assert batch_factors(TRUE, few) == ()  # two steps of batch 3: not enough for a factor of its own
    model = MeasuredSteps(**{**TRUE.as_dict(), "decode_batch_factor": (1.0, 1.2)})
    assert MeasuredSteps.from_dict(model.as_dict()) == model
    assert MeasuredSteps.from_dict({k: v for k, v in TRUE.as_dict().items() if k != "decode_batch_factor"}) == TRUE
    with pytest.raises(ValueError, match="decode_batch_factor"):
        MeasuredSteps(**{**TRUE.as_dict(), "decode_batch_factor": (1.0, 0.0)})
