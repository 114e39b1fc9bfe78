"""KV formats the representation tests share: one of every supported encoding, and helpers."""

from __future__ import annotations

import torch

from hetpd.kv.bounds import ErrorBound
from hetpd.kv.format import KVFormat, ModelFingerprint, Quantization

MODEL = ModelFingerprint("LlamaForCausalLM", num_layers=2, num_kv_heads=4, head_dim=32,
                         rope='{"theta": 10000.0}', tokenizer_hash="t0", config_hash="c0")

# Every encoding hetpd can read or write: each dtype, each scale scheme, each scale dtype at least once.
ENCODINGS: dict[str, tuple[str, Quantization]] = {
    "fp32": ("float32", Quantization()),
    "bf16": ("bfloat16", Quantization()),
    "fp16": ("float16", Quantization()),
    "int8/token-head/f32": ("int8", Quantization("per_token_head", "float32")),
    "int8/token-head/f16": ("int8", Quantization("per_token_head", "float16")),
    "int8/tensor/f32": ("int8", Quantization("per_tensor", "float32")),
    "fp8/token-head/f32": ("fp8_e4m3", Quantization("per_token_head", "float32")),
    "fp8/token-head/bf16": ("fp8_e4m3", Quantization("per_token_head", "bfloat16")),
    "fp8/tensor/f32": ("fp8_e4m3", Quantization("per_tensor", "float32")),
    "int4/group32/f16": ("int4", Quantization("per_group", "float16", group_size=32)),
    "int4/group16+zero/f16": ("int4", Quantization("per_group", "float16", group_size=16, zero_point=True)),
    "int4/group8+zero/bf16": ("int4", Quantization("per_group", "bfloat16", group_size=8, zero_point=True)),
}


def fmt(encoding: str, **changes: object) -> KVFormat:
    dtype, quant = ENCODINGS[encoding]
    base = KVFormat(MODEL, dtype, page_size=16, head_start=0, head_end=MODEL.num_kv_heads, quant=quant)
    return base.with_(**changes) if changes else base


def unit_absmax(x: torch.Tensor, bound: ErrorBound, group_size: int | None) -> torch.Tensor:
    """absmax of the unit each element's error bound refers to, broadcast to x's shape ([L, 2, T, H, D])."""
    if bound.unit == "tensor":
        return x.abs().amax(dim=(-3, -2, -1), keepdim=True).expand_as(x)
    if bound.unit == "group":
        assert group_size is not None
        grouped = x.reshape(*x.shape[:-1], -1, group_size)
        return grouped.abs().amax(dim=-1, keepdim=True).expand_as(grouped).reshape(x.shape)
    return x.abs().amax(dim=-1, keepdim=True).expand_as(x)


def within_bound(reference: torch.Tensor, got: torch.Tensor, bound: ErrorBound, group_size: int | None) -> bool:
    limit = bound.relative * unit_absmax(reference, bound, group_size) + bound.absolute
    return bool(torch.all((got - reference).abs() <= limit))


def kv_values(tokens: int, heads: int = 4, head_dim: int = 32, layers: int = 2, seed: int = 0,
              magnitude: float = 1.0) -> torch.Tensor:
    """Random KV with a few outlier channels, as real K caches have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, 2, tokens, heads, head_dim, generator=g) * magnitude
    x[..., :2] *= 8.0
    return x
