"""KV formats the representation tests share: one of every supported encoding, and helpers."""

from __future__ import annotations

import torch

from hetpd.kv.bounds import ErrorBound
from hetpd.kv.encodings import ENCODINGS, format_for
from hetpd.kv.format import KVFormat, ModelFingerprint

__all__ = ["ENCODINGS", "MODEL", "fmt", "kv_values", "within_bound"]

MODEL = ModelFingerprint("LlamaForCausalLM", num_layers=2, num_kv_heads=4, head_dim=32,
                         rope='{"theta": 10000.0}', tokenizer_hash="t0", config_hash="c0")



def fmt(encoding: str, **changes: object) -> KVFormat:
    return format_for(MODEL, encoding, **changes)


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
