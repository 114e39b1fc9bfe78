"""KV element codecs: how one K or V vector is stored in the cache, and back.

Quantised codecs keep one float32 scale per token per head (absmax over head_dim), so a
page's scales travel with its bytes: without them fp8 / int8 KV is noise on the other side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Canonical names, as written in KV format descriptors and configs.
KV_DTYPES = ("float32", "bfloat16", "float16", "int8", "fp8_e4m3")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp8": "fp8_e4m3"}

_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT8_MAX = 127.0
_MIN_SCALE = 1e-8  # an all-zero vector still gets a usable scale


def canonical_kv_dtype(name: str) -> str:
    """Map user spellings (``fp8``, ``bf16``...) to the canonical name; reject unknown ones."""
    canonical = _ALIASES.get(name, name)
    if canonical not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported; choose one of {KV_DTYPES}")
    return canonical


@dataclass(frozen=True)
class KVCodec:
    """Encoder/decoder for one KV element dtype.

    ``storage_dtype`` is what the pool holds; quantised codecs store raw bytes as uint8
    views so indexing kernels never need fp8 support.
    """

    name: str

    @property
    def quantized(self) -> bool:
        return self.name in ("int8", "fp8_e4m3")

    @property
    def element_bytes(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8_e4m3": 1}[self.name]

    @property
    def storage_dtype(self) -> torch.dtype:
        return {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "int8": torch.int8,
            "fp8_e4m3": torch.uint8,
        }[self.name]

    @property
    def scale_bound(self) -> float:
        """Worst-case |error| / absmax of a vector after a round trip (0 when lossless for fp32)."""
        return {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11, "int8": 0.5 / _INT8_MAX, "fp8_e4m3": 2.0**-4}[
            self.name
        ]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x``: [..., head_dim] floats -> (stored elements, per-vector float32 scales or None)."""
        if not self.quantized:
            return x.to(self.storage_dtype), None
        absmax = x.abs().amax(dim=-1).float().clamp_min(_MIN_SCALE)
        if self.name == "int8":
            scale = absmax / _INT8_MAX
            q = torch.round(x.float() / scale.unsqueeze(-1)).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
            return q, scale
        scale = absmax / _FP8_MAX
        q8 = (x.float() / scale.unsqueeze(-1)).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        return q8.view(torch.uint8), scale

    def decode(self, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`encode`, producing ``dtype``."""
        if not self.quantized:
            return data.to(dtype)
        assert scale is not None, f"{self.name} KV needs its scales"
        values = data.view(torch.float8_e4m3fn) if self.name == "fp8_e4m3" else data
        return (values.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def codec_for(name: str) -> KVCodec:
    return KVCodec(canonical_kv_dtype(name))
