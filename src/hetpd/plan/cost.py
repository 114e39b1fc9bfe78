"""The cost model: pure functions of a model shape, an accelerator, formats and a batch.

Each returns a named result that says which resource binds, so the planner can explain
itself. Times in seconds, bytes in bytes. Efficiency factors default to catalog-style priors
and come from calibration files where ``hetpd profile`` measured them.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetpd.plan.spec import FORMAT_BYTES, Accelerator, Link, ModelShape


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak: matmul compute, memory bandwidth (calibrated per device)."""

    compute: float = 0.6
    memory: float = 0.8


@dataclass(frozen=True)
class StageTime:
    seconds: float
    compute_s: float
    memory_s: float
    binding: str  # "compute" | "bandwidth"


def _bytes(fmt: str) -> float:
    if fmt not in FORMAT_BYTES:
        raise ValueError(f"format {fmt!r} is unknown to the cost model; choose one of {sorted(FORMAT_BYTES)}")
    return FORMAT_BYTES[fmt]


def weight_bytes(model: ModelShape, weight_fmt: str, active: bool = False) -> float:
    params = model.params_active_b if active else model.params_total_b
    return params * 1e9 * _bytes(weight_fmt)


def kv_bytes_per_token(model: ModelShape, kv_fmt: str) -> float:
    return model.kv_elements_per_token() * _bytes(kv_fmt)


def attention_flops(model: ModelShape, new_tokens: int, context: int) -> float:
    """QK^T and PV for ``new_tokens`` attending to ``context`` tokens each (causal within the chunk)."""
    q_width = model.num_attention_heads * model.head_dim
    return 2 * 2 * model.layers * q_width * new_tokens * context


def step_time(model: ModelShape, acc: Accelerator, compute_fmt: str, weight_fmt: str, kv_fmt: str,
              prefill_tokens: int, prefill_pairs: int, decode_seqs: int, decode_context: int,
              eff: Efficiency = Efficiency()) -> StageTime:
    """One engine step: ``prefill_tokens`` prompt tokens with ``prefill_pairs`` causal attention
    pairs among them, plus ``decode_seqs`` sequences decoding one token each over
    ``decode_context`` tokens of KV in all. Compute is 2 x active params FLOPs per token plus
    attention; memory is reading the weights once (only the active experts' for a small decode
    batch of a MoE) and the decoders' KV. The larger binds."""
    q_width = model.num_attention_heads * model.head_dim
    flops = 2 * model.params_active_b * 1e9 * (prefill_tokens + decode_seqs)
    flops += 2 * 2 * model.layers * q_width * (prefill_pairs + decode_context)  # QK^T and PV
    compute = flops / (acc.flops(compute_fmt) * eff.compute)
    active = model.num_experts is None or (prefill_tokens == 0 and decode_seqs < 4)
    moved = weight_bytes(model, weight_fmt, active=active) + kv_bytes_per_token(model, kv_fmt) * decode_context
    memory = moved / (acc.memory_bandwidth * eff.memory)
    return StageTime(max(compute, memory), compute, memory, "compute" if compute >= memory else "bandwidth")


def prefill_time(model: ModelShape, acc: Accelerator, compute_fmt: str, weight_fmt: str, prompt_lengths: list[int],
                 eff: Efficiency = Efficiency()) -> StageTime:
    """One prefill batch of whole prompts: 2 x active params FLOPs per token plus attention's
    quadratic term, against reading the weights once; the larger of compute and memory binds."""
    pairs = sum(n * (n + 1) // 2 for n in prompt_lengths)  # causal: each token attends to those before it
    return step_time(model, acc, compute_fmt, weight_fmt, "bf16", sum(prompt_lengths), pairs, 0, 0, eff)


def decode_step_time(model: ModelShape, acc: Accelerator, compute_fmt: str, weight_fmt: str, kv_fmt: str,
                     contexts: list[int], eff: Efficiency = Efficiency()) -> StageTime:
    """One decode step for a batch with these context lengths: read the (active) weights and every
    sequence's KV at memory bandwidth, or compute the batch's FLOPs, whichever takes longer."""
    return step_time(model, acc, compute_fmt, weight_fmt, kv_fmt, 0, 0, len(contexts), sum(contexts), eff)


@dataclass(frozen=True)
class HandoffTime:
    seconds: float
    wire_bytes: float
    transfer_s: float
    overhead_s: float
    conversion_s: float
    binding: str  # "link" | "per-transfer overhead" | "conversion"


def handoff_time(model: ModelShape, wire_fmt: str, prompt_tokens: int, link: Link, page_tokens: int = 16,
                 transfers_per_page: int = 1, conversion_gbps: float | None = None,
                 overlap_fraction: float = 0.0) -> HandoffTime:
    """Move one request's KV: bytes in the wire format over the link at its achieved bandwidth,
    plus a per-transfer overhead per page (descriptors), plus conversion at ``conversion_gbps``
    (None: no conversion). ``overlap_fraction`` of the wire time hides behind prefill when the
    sender streams layer by layer."""
    wire = kv_bytes_per_token(model, wire_fmt) * prompt_tokens
    pages = -(-prompt_tokens // page_tokens)
    transfer = wire / link.bandwidth + link.latency_us * 1e-6
    overhead = pages * transfers_per_page * link.per_transfer_overhead_us * 1e-6
    conversion = 0.0 if conversion_gbps is None else wire / (conversion_gbps * 1e9)
    visible = transfer * (1.0 - overlap_fraction)
    parts = {"link": visible, "per-transfer overhead": overhead, "conversion": conversion}
    return HandoffTime(sum(parts.values()), wire, transfer, overhead, conversion, max(parts, key=parts.__getitem__))


@dataclass(frozen=True)
class MemoryFit:
    fits: bool
    weights_bytes: float
    kv_pool_bytes: float
    transient_bytes: float
    free_bytes: float
    reason: str = ""


def memory_fit(model: ModelShape, acc: Accelerator, weight_fmt: str, kv_fmt: str, kv_pool_tokens: int,
               transient_tokens: int = 0, tensor_parallel: int = 1, headroom: float = 0.1) -> MemoryFit:
    """Weights (split over ``tensor_parallel`` devices) + the KV pool + KV held during handoffs must
    fit in each device's memory, keeping ``headroom`` for activations and fragmentation."""
    weights = weight_bytes(model, weight_fmt) / tensor_parallel
    kv = kv_bytes_per_token(model, kv_fmt) * kv_pool_tokens / tensor_parallel
    transient = kv_bytes_per_token(model, kv_fmt) * transient_tokens / tensor_parallel
    budget = acc.memory_bytes * (1.0 - headroom)
    free = budget - weights - kv - transient
    if free >= 0:
        return MemoryFit(True, weights, kv, transient, free)
    what = "the weights alone" if weights > budget else "weights + KV pool + handoff transients"
    return MemoryFit(False, weights, kv, transient, free,
                     f"{what} need {(weights + kv + transient) / 1e9:.1f} GB of {acc.id}'s "
                     f"{budget / 1e9:.1f} GB usable (TP={tensor_parallel}); raise tensor parallelism, "
                     "pick a narrower format, or shrink the KV pool")
