"""Error bounds of KV element encodings. Pure Python, no torch.

Every bound has the form ``|decoded - original| <= relative * absmax(unit) + absolute`` where
``unit`` is what one scale covers: a token-head vector, a layer's whole K (or V), or a group
of ``group_size`` elements. For float dtypes the unit is the token-head vector (a float cast
errs by at most its unit roundoff times ``|x| <= absmax``).

The derivations (round to nearest, scales rounded *up* into their dtype so nothing clips,
zero points rounded *down*) are in ``docs/kv-boundary.md``; the codec tests measure them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Unit roundoff 2^-p of each float format with p significand bits (implicit bit included).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11, "fp8_e4m3": 2.0**-4}
# Largest |code| of each quantised dtype (int4 symmetric uses [-7, 7], asymmetric [0, 15]).
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "int4": 7.0}
_FP32_ARITHMETIC = 2.0**-20  # slack for float32 rounding inside encode/decode (a few ulps of absmax)
_FP16_SUBNORMAL_HALF_STEP = 2.0**-25


@dataclass(frozen=True)
class ErrorBound:
    relative: float
    unit: str  # "token_head" | "tensor" | "group"
    absolute: float = 0.0

    @property
    def exact(self) -> bool:
        return self.relative == 0.0 and self.absolute == 0.0

    def describe(self) -> str:
        if self.exact:
            return "exact"
        text = f"<= {self.relative:.3g} x absmax per {self.unit.replace('_', '-')}"
        return text + (f" + {self.absolute:.3g}" if self.absolute else "")

    def loosest(self, other: ErrorBound) -> ErrorBound:
        """The weaker of two bounds (used when a conversion encodes twice, e.g. via a wire format)."""
        if self.exact:
            return other
        if other.exact:
            return self
        # Both measured against the consumer's values; a coarser unit's absmax is >= a finer one's.
        order = {"group": 0, "token_head": 1, "tensor": 2}
        unit = max(self.unit, other.unit, key=order.__getitem__)
        # |c - p| <= |c - w| + |w - p| and absmax(w) <= absmax(p) * (1 + r1): hence the product term.
        relative = self.relative + other.relative + self.relative * other.relative
        return ErrorBound(relative, unit, self.absolute + other.absolute)


def encoding_bound(dtype: str, scheme: str, scale_dtype: str | None, zero_point: bool = False) -> ErrorBound:
    """Round-trip error of encoding float32 values into ``dtype`` under ``scheme``."""
    if dtype == "float32":
        return ErrorBound(0.0, "token_head")
    if dtype in ("bfloat16", "float16"):
        floor = _FP16_SUBNORMAL_HALF_STEP if dtype == "float16" else 0.0
        return ErrorBound(UNIT_ROUNDOFF[dtype], "token_head", floor)
    assert scale_dtype is not None, f"{dtype} needs a scale dtype"
    u_scale = UNIT_ROUNDOFF[scale_dtype]
    # A float16 scale (or zero point) below 2^-14 is subnormal: it rounds by up to 2^-24 absolute,
    # which no relative term covers for tiny vectors. bf16 and fp32 share float32's exponent range.
    floor = 2.0**-24 if scale_dtype == "float16" else 0.0
    unit = {"per_token_head": "token_head", "per_tensor": "tensor", "per_group": "group"}[scheme]
    if dtype == "fp8_e4m3":
        # Normal range: relative 2^-4 of |x| <= absmax. Subnormals err by <= 2^-10 * scale, far less.
        return ErrorBound(UNIT_ROUNDOFF["fp8_e4m3"] + _FP32_ARITHMETIC, unit, floor)
    if dtype == "int4" and zero_point:
        # scale = (max - zero) / 15 <= 2 absmax (1 + u) / 15 (1 + 2u); error <= scale / 2.
        return ErrorBound(1.0 / 15.0 * (1 + 4 * u_scale) + _FP32_ARITHMETIC, unit, floor)
    # Symmetric: scale = absmax / qmax, rounded up by <= 2u; error <= scale / 2.
    return ErrorBound(0.5 / QMAX[dtype] * (1 + 2 * u_scale) + _FP32_ARITHMETIC, unit, floor)


def dequantise_exactly(dtype: str, scale_dtype: str | None, zero_point: bool, target: str) -> bool:
    """Whether code * scale (+ zero) is exactly representable in ``target`` (a lossless widening)."""
    if zero_point or scale_dtype is None or target not in UNIT_ROUNDOFF:
        return False
    code_bits = {"int8": 7, "int4": 3, "fp8_e4m3": 4}[dtype]  # significant bits of one code
    scale_bits = {"float32": 24, "bfloat16": 8, "float16": 11}[scale_dtype]
    target_bits = {"float32": 24, "bfloat16": 8, "float16": 11}.get(target, 0)
    # fp8 codes also carry an exponent; the product stays exact while the target's exponent range holds it,
    # which float32 does for every fp8 code times a bf16/fp16 scale.
    if target != "float32" and dtype == "fp8_e4m3":
        return False
    return code_bits + scale_bits <= target_bits
