"""The cost model against figures worked out by hand from the catalog's numbers."""

from __future__ import annotations

import pytest

from hetpd.plan.cost import Efficiency, decode_step_time, handoff_time, memory_fit, prefill_time
from hetpd.plan.spec import load_catalog

CATALOG = load_catalog()
H100 = CATALOG.accelerator("nvidia_h100_sxm")
LLAMA8 = CATALOG.model("llama_3_1_8b")
LLAMA70 = CATALOG.model("llama_3_1_70b")


def test_small_batch_decode_is_bandwidth_bound() -> None:
    step = decode_step_time(LLAMA8, H100, "bf16", "bf16", "bf16", [1000], Efficiency(compute=0.6, memory=0.8))
    weights = 8.03e9 * 2 / (3.35e12 * 0.8)
    kv = 131072 * 1000 / (3.35e12 * 0.8)
    assert step.binding == "bandwidth" and step.seconds == pytest.approx(weights + kv, rel=1e-6)
    fp8 = decode_step_time(LLAMA8, H100, "fp8", "fp8", "fp8", [1000])
    assert fp8.seconds == pytest.approx(step.seconds / 2, rel=0.01)  # half the bytes to read


def test_large_batch_decode_turns_compute_bound() -> None:
    step = decode_step_time(LLAMA8, H100, "bf16", "bf16", "fp8", [128] * 1024)
    assert step.binding == "compute" and step.compute_s > step.memory_s


def test_prefill_is_compute_bound_and_counts_the_quadratic_term() -> None:
    short = prefill_time(LLAMA8, H100, "bf16", "bf16", [512] * 8)
    long = prefill_time(LLAMA8, H100, "bf16", "bf16", [4096])
    assert short.binding == "compute" and long.binding == "compute"
    linear = 2 * 8.03e9 * 4096 / (989.4e12 * 0.6)
    assert long.compute_s > linear  # attention adds on top of the weights' FLOPs
    assert long.compute_s == pytest.approx(linear + 4 * 32 * 4096 * 4096 * 2048 / (989.4e12 * 0.6), rel=1e-3)


def test_handoff_over_a_slow_and_a_fast_link() -> None:
    slow = handoff_time(LLAMA8, "fp8", 4096, CATALOG.link("tcp_25gbe"))
    fast = handoff_time(LLAMA8, "fp8", 4096, CATALOG.link("nvlink4_hopper"))
    assert slow.wire_bytes == 65536 * 4096
    assert slow.binding == "link" and slow.seconds > 10 * fast.seconds
    bf16 = handoff_time(LLAMA8, "bf16", 4096, CATALOG.link("tcp_25gbe"))
    assert bf16.transfer_s == pytest.approx(2 * slow.transfer_s, rel=0.01)
    streamed = handoff_time(LLAMA8, "fp8", 4096, CATALOG.link("tcp_25gbe"), overlap_fraction=0.9)
    assert streamed.seconds < slow.seconds


def test_memory_fit_names_what_does_not_fit() -> None:
    alone = memory_fit(LLAMA70, H100, "bf16", "bf16", kv_pool_tokens=100_000)
    assert not alone.fits and "weights alone" in alone.reason and "tensor parallelism" in alone.reason
    split = memory_fit(LLAMA70, H100, "bf16", "fp8", kv_pool_tokens=10_000, tensor_parallel=4)
    assert split.fits and split.free_bytes > 0
    squeezed = memory_fit(LLAMA70, H100, "bf16", "fp8", kv_pool_tokens=10_000, transient_tokens=2_000_000,
                          tensor_parallel=4)
    assert not squeezed.fits and "handoff transients" in squeezed.reason


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="format 'fp6'"):
        decode_step_time(LLAMA8, H100, "bf16", "fp6", "bf16", [10])
