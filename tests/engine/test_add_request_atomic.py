"""A request the engine refuses leaves no trace: add_request and commit_kv fail before any state changes.

The failure that motivated this: a seed torch.Generator refuses ("Overflow when unpacking long
long") raised after the sequence was scheduled, so the next step found a sequence without a
request and failed with KeyError for every request in the batch (the worker died).
SamplingParams now refuses such seeds itself; these tests build params that got past it anyway
(as a message from a peer with other validation might) to check the engine's own guard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hetpd import SamplingParams
from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine
from hetpd.engine.sampler import sample

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def unchecked(params: SamplingParams, **fields: object) -> SamplingParams:
    """``params`` with ``fields`` set past __post_init__'s checks."""
    bad = dataclasses.replace(params)
    for name, value in fields.items():
        object.__setattr__(bad, name, value)
    return bad


def run(engine: Engine) -> dict[str, list[int]]:
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step().finished:
            done[out.request_id] = list(out.outputs[0].token_ids)
    return done


@pytest.fixture()
def engine(tiny_model_dir: Callable[[str], Path]) -> Engine:
    return Engine.from_config(EngineConfig(model=str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=32))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_the_generator_refuses_leaves_the_engine_untouched(engine: Engine, seed: int) -> None:
    engine.add_request("ok", [5, 6, 7], GREEDY)
    bad = unchecked(SamplingParams(max_tokens=4, temperature=0.7), seed=seed)
    with pytest.raises(ValueError, match="seed"):
        engine.add_request("bad", [5, 6, 7], bad)
    assert not engine.is_running("bad") and [s.seq_id for s in engine.scheduler.waiting] == ["ok"]
    assert run(engine).keys() == {"ok"}  # the step that used to fail with KeyError
    engine.add_request("bad", [5, 6, 7], dataclasses.replace(bad, seed=7))  # the id is free: nothing was kept
    assert len(run(engine)["bad"]) == 4
    assert engine.allocator.stats().num_in_use == 0


def test_a_refused_import_keeps_the_reservation_for_the_caller_to_cancel(tiny_model_dir: Callable[[str], Path]) -> None:
    model = str(tiny_model_dir("llama"))
    prefill = Engine.from_config(EngineConfig(model=model, role="prefill", block_size=4))
    decode = Engine.from_config(EngineConfig(model=model, role="decode", block_size=4, num_kv_blocks=16))
    prefill.add_request("r", list(range(3, 12)), GREEDY)
    prefill.step()
    export = prefill.export_kv("r")
    reservation = decode.reserve_kv("r", export.num_tokens)
    assert reservation.accepted
    with pytest.raises(ValueError, match="seed"):
        decode.commit_kv(export, unchecked(SamplingParams(max_tokens=4, temperature=0.7), seed=2**64))
    assert decode.reserved_request_ids() == ["r"] and not decode.has_unfinished()
    assert decode.commit_kv(export, GREEDY).accepted  # the reservation is intact: a good commit still works
    assert len(run(decode)["r"]) == 4
    prefill.release_kv("r")
    assert decode.allocator.stats().num_in_use == 0 and prefill.allocator.stats().num_in_use == 0


def test_a_temperature_below_1e_5_samples_the_argmax() -> None:
    """Dividing logits by 1e-40 overflows to inf and softmax makes NaN: such rows are greedy."""
    logits = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)) * 10
    params = [SamplingParams(temperature=t) for t in (1e-40, 5e-324, 9e-6)]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample(logits, params, generators).token_ids == logits.argmax(dim=-1).tolist()


def test_near_greedy_temperatures_still_sample_the_argmax_without_nan() -> None:
    # Just above the greedy bound, logits / T is large but finite: the draw is the argmax.
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)) * 10
    params = [SamplingParams(temperature=1e-5, top_p=p, top_k=k) for p, k in ((1.0, -1), (0.5, -1), (1.0, 3), (0.9, 5))]
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(logits, params, generators).token_ids == logits.argmax(dim=-1).tolist()
