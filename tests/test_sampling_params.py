"""SamplingParams refuses, naming the field, every value the engine could not sample with."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from hetpd.sampling_params import GREEDY_BELOW, SEED_MAX, SEED_MIN, SamplingParams


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, 7, SEED_MAX])
def test_every_seed_in_the_int64_range_is_accepted_and_seeds_a_generator(seed: int) -> None:
    params = SamplingParams(seed=seed)
    assert params.seed == seed
    torch.Generator().manual_seed(seed)  # what the engine does with it: must not raise


def test_int64_seeds_seed_distinct_generators() -> None:
    # manual_seed maps a negative s to 2**64 + s: disjoint from the non-negative int64 seeds.
    seeds = [SEED_MIN, -1, 0, 1, SEED_MAX]
    assert len({torch.Generator().manual_seed(s).initial_seed() for s in seeds}) == len(seeds)


@pytest.mark.parametrize("seed", [SEED_MAX + 1, 2**64, SEED_MIN - 1, True, 1.5, "5", 10**40])
def test_a_seed_outside_int64_or_not_an_int_is_refused_by_name(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)  # type: ignore[arg-type]


def test_seeds_just_outside_the_range_are_ones_torch_refuses() -> None:
    """Why the range is where it is: the first seeds beyond it overflow torch.Generator."""
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises((ValueError, OverflowError, RuntimeError)):
            torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 5e-324, 9.99e-6])
def test_a_temperature_below_1e_5_is_greedy(temperature: float) -> None:
    assert SamplingParams(temperature=temperature).greedy


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 0.7, 100.0])
def test_other_temperatures_sample(temperature: float) -> None:
    assert not SamplingParams(temperature=temperature).greedy


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.1), ("temperature", 100.5),
    ("temperature", True), ("temperature", "1"), ("temperature", 10**400),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_p", False),
    ("max_tokens", 0), ("max_tokens", -809), ("max_tokens", True), ("max_tokens", 2.0),
    ("top_k", 1.5), ("top_k", True),
    ("logprobs", 21), ("logprobs", -1), ("logprobs", True),
    ("stop_token_ids", (True,)), ("stop_token_ids", (1.5,)), ("stop_token_ids", ("2",)),
])
def test_bad_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_int_likes_are_accepted_as_stop_token_ids() -> None:
    params = SamplingParams(stop_token_ids=(numpy.int64(5), 7))  # type: ignore[arg-type]
    assert params.stop_token_ids == (5, 7) and all(type(t) is int for t in params.stop_token_ids)
