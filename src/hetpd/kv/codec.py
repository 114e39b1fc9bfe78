"""KV element codecs: how K or V vectors are stored, and back (torch).

A codec is an element dtype plus a :class:`~hetpd.kv.format.Quantization`. Quantised codecs
carry their scales (and int4's zero points) next to the codes: without them fp8 / int8 KV is
noise on the other side. Scales are rounded *up* into their dtype (zero points *down*) so no
code ever clips; the resulting bounds are :func:`hetpd.kv.bounds.encoding_bound`.

Shapes: ``x`` is ``[..., T, H, D]``. Scales (and zeros) are ``[..., T, H]`` per token-head,
``[..., T, H, D // group_size]`` per group, and ``[...]`` per tensor (one per leading index:
callers pass ``[layers, 2, T, H, D]`` so that is one per layer's K and one per layer's V).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from hetpd.kv.bounds import QMAX, ErrorBound, encoding_bound
from hetpd.kv.format import ELEMENT_BITS, KV_DTYPES, Quantization, canonical_kv_dtype

__all__ = ["KV_DTYPES", "Encoded", "KVCodec", "canonical_kv_dtype", "codec_for"]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIN_SCALE = 1e-8  # an all-zero vector still gets a usable scale


class Encoded(NamedTuple):
    codes: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None


@dataclass(frozen=True)
class KVCodec:
    """Encoder/decoder for one element dtype and scale scheme.

    ``storage_dtype`` is what tensors of codes hold; fp8 and int4 are stored as raw uint8 so
    indexing and byte packing never need fp8 kernels (int4: two codes per byte, low nibble first).
    """

    dtype: str
    quant: Quantization = Quantization()

    @property
    def name(self) -> str:
        return self.dtype

    @property
    def quantized(self) -> bool:
        return self.quant.scheme != "none"

    @property
    def element_bytes(self) -> float:
        return ELEMENT_BITS[self.dtype] / 8

    @property
    def storage_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES.get(self.dtype, torch.int8 if self.dtype == "int8" else torch.uint8)

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        assert self.quant.scale_dtype is not None
        return _TORCH_DTYPES[self.quant.scale_dtype]

    @property
    def error_bound(self) -> ErrorBound:
        q = self.quant
        return encoding_bound(self.dtype, q.scheme, q.scale_dtype, q.zero_point)

    @property
    def scale_bound(self) -> float:
        """Relative part of :attr:`error_bound` (kept for the engine's per-vector codecs)."""
        return self.error_bound.relative

    def storage_dim(self, head_dim: int) -> int:
        return head_dim // 2 if self.dtype == "int4" else head_dim

    # ------------------------------------------------------------------ encode
    def encode(self, x: torch.Tensor) -> Encoded:
        """``x``: [..., T, H, D] floats -> codes (+ scales, zeros), see the module docstring for shapes."""
        if not self.quantized:
            return Encoded(x.to(self.storage_dtype), None, None)
        xf = x.float()
        units = self._units(xf)  # [..., U, n]: the elements sharing one scale on the last axis
        if self.quant.zero_point:
            codes, scale, zero = self._encode_asymmetric(units)
        else:
            absmax = units.abs().amax(dim=-1).clamp_min(_MIN_SCALE)
            scale = _round_up(absmax / QMAX[self.dtype], self.scale_torch_dtype)
            codes, zero = self._quantise_symmetric(units / scale.float().unsqueeze(-1)), None
        if not bool(torch.isfinite(scale).all()) or (zero is not None and not bool(torch.isfinite(zero).all())):
            raise ValueError(f"KV values overflow {self.quant.scale_dtype} scales: use float32 or bfloat16 scale_dtype")
        codes = codes.reshape(x.shape)
        return Encoded(_pack_int4(codes) if self.dtype == "int4" else codes, self._unit_shape(scale),
                       None if zero is None else self._unit_shape(zero))

    def _quantise_symmetric(self, y: torch.Tensor) -> torch.Tensor:
        if self.dtype == "fp8_e4m3":
            return y.clamp(-QMAX["fp8_e4m3"], QMAX["fp8_e4m3"]).to(torch.float8_e4m3fn).view(torch.uint8)
        qmax = QMAX[self.dtype]
        q = torch.round(y).clamp_(-qmax, qmax)
        return (q + 8).to(torch.uint8) if self.dtype == "int4" else q.to(torch.int8)

    def _encode_asymmetric(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = _round_down(units.amin(dim=-1), self.scale_torch_dtype)
        span = (units.amax(dim=-1) - zero.float()).clamp_min(_MIN_SCALE)
        scale = _round_up(span / 15.0, self.scale_torch_dtype)
        q = torch.round((units - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, 15)
        return q.to(torch.uint8), scale, zero

    # ------------------------------------------------------------------ decode
    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype,
               zeros: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`encode`, producing ``dtype`` (computed in float32)."""
        if not self.quantized:
            return codes.to(dtype)
        assert scales is not None, f"{self.dtype} KV needs its scales"
        if self.dtype == "fp8_e4m3":
            values = codes.view(torch.float8_e4m3fn).float()
        elif self.dtype == "int4":
            values = _unpack_int4(codes).float() - (0.0 if self.quant.zero_point else 8.0)
        else:
            values = codes.float()
        shape = values.shape
        units = self._units(values)
        out = units * self._scale_units(scales).float().unsqueeze(-1)
        if self.quant.zero_point:
            assert zeros is not None, "asymmetric int4 KV needs its zero points"
            out = out + self._scale_units(zeros).float().unsqueeze(-1)
        return out.reshape(shape).to(dtype)

    # ------------------------------------------------------------------ unit views
    def _units(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T, H, D] -> [..., U, n] where each row of n elements shares one scale."""
        scheme = self.quant.scheme
        if scheme == "per_token_head":
            return x
        if scheme == "per_group":
            assert self.quant.group_size is not None
            return x.reshape(*x.shape[:-1], -1, self.quant.group_size)
        return x.flatten(-3).unsqueeze(-2)  # per_tensor: one row per leading index

    def _unit_shape(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Per-unit values (scale or zero) in the documented scale shape."""
        return per_unit.squeeze(-1) if self.quant.scheme == "per_tensor" else per_unit

    def _scale_units(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.unsqueeze(-1) if self.quant.scheme == "per_tensor" else scales


def _round_up(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype``, never below it (a scale rounded down would make codes clip)."""
    rounded = value.to(dtype)
    return torch.where(rounded.float() < value, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)), rounded)


def _round_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype``, never above it (a zero point above the minimum would make codes clip)."""
    rounded = value.to(dtype)
    return torch.where(rounded.float() > value, torch.nextafter(rounded, torch.full_like(rounded, -torch.inf)), rounded)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    packed: torch.Tensor = pairs[..., 0] | pairs[..., 1].bitwise_left_shift(4)
    return packed


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed.bitwise_right_shift(4)), dim=-1).flatten(-2)


def codec_for(name: str) -> KVCodec:
    """The engine's at-rest codec for a KV cache dtype name (quantised: float32 scale per token-head)."""
    dtype = canonical_kv_dtype(name)
    if dtype in ("int8", "fp8_e4m3"):
        return KVCodec(dtype, Quantization("per_token_head", "float32"))
    return KVCodec(dtype)
