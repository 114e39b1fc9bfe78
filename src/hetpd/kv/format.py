"""KV format descriptor: what the bytes of a request's KV mean. Pure Python, no torch.

Transfer engines move bytes, not tensors; this descriptor travels with them so the other
side can tell whether it can use them as is, convert them, or must refuse (see ``check.py``).

A descriptor may hold values this hetpd does not know (a newer peer's dtype, an extra field
read from JSON): construction never fails on them, :meth:`KVFormat.problems` names them, and
``check`` then answers *incompatible*. Nothing is ever guessed.

Byte layout of a payload of ``T`` tokens and ``L`` layers (``P = ceil(T / page_size)`` pages,
the last one zero-padded), layer-major so a layer range is one contiguous byte range and a
sender can stream layer by layer::

    for each layer:
        elements, in "units":  kv_split -> for K, V: for each page: one page   (unit = one page of K or V)
                               joint    -> for each page: K page, V page     (unit = one page of K and V)
          one page is [page_size, heads, dim] (NHD) or [heads, page_size, dim] (HND)
        scales (quantised):    scale_location "separate" -> all the layer's scales after its elements
                               scale_location "inline"   -> each unit's scales right after that unit
          per_token_head: one per token per head; per_group: one per (token, head, group);
          per_tensor: one for K and one for V of the layer ("separate" only).
          With zero points (int4 asymmetric), each scale block is followed by its zero block.

int4 packs two elements per byte along ``dim``, low nibble first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hetpd.models.config import ModelConfig

FORMAT_VERSION = 2

ELEMENT_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "fp8_e4m3": 8, "int8": 8, "int4": 4}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
QUANTISED_DTYPES = ("fp8_e4m3", "int8", "int4")
SCHEMES = ("none", "per_tensor", "per_token_head", "per_group")
SCALE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SCALE_LOCATIONS = ("separate", "inline")
LAYOUTS = ("NHD", "HND")
# Which scale schemes each quantised element dtype may use.
_SCHEMES_FOR = {"fp8_e4m3": ("per_tensor", "per_token_head"), "int8": ("per_tensor", "per_token_head"),
                "int4": ("per_group",)}


# The engine's at-rest KV cache dtypes (quantised ones keep one float32 scale per token-head).
KV_DTYPES = ("float32", "bfloat16", "float16", "int8", "fp8_e4m3")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp8": "fp8_e4m3"}


def canonical_kv_dtype(name: str) -> str:
    """Map user spellings (``fp8``, ``bf16``...) to the canonical name; reject unknown ones."""
    canonical = _ALIASES.get(name, name)
    if canonical not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported; choose one of {KV_DTYPES}")
    return canonical


class IncompatibleKVError(ValueError):
    """The producer's KV cannot be used by this consumer; the message names the fields and the fix."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything about the model that gives KV values their meaning (not the weights' precision)."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: str  # canonical RoPE parameters, e.g. "llama3 theta=500000.0 factor=8.0 ..."
    tokenizer_hash: str  # "none" when the model has no tokenizer
    config_hash: str  # hash of the whole KV-shaping config (catches what the fields above miss)

    @classmethod
    def of(cls, config: ModelConfig, tokenizer_hash: str | None) -> ModelFingerprint:
        rope = json.dumps(asdict(config.rope), sort_keys=True)
        return cls(config.architecture, config.num_layers, config.num_kv_heads, config.head_dim, rope,
                   tokenizer_hash or "none", config.fingerprint)


@dataclass(frozen=True)
class Quantization:
    """How quantised elements are scaled. ``scheme="none"`` for float dtypes."""

    scheme: str = "none"
    scale_dtype: str | None = None
    group_size: int | None = None  # per_group only: elements of ``dim`` sharing one scale
    zero_point: bool = False  # per_group int4 only: asymmetric (x ~ q * scale + zero)
    scale_location: str = "separate"


@dataclass(frozen=True)
class KVFormat:
    """The meaning of a KV payload's bytes (see the module docstring for the byte layout).

    Heads ``[head_start, head_end)`` of the model's ``num_kv_heads`` (a tensor-parallel shard
    holds a sub-range). ``rope_applied``: K is stored after rotary embedding.
    """

    model: ModelFingerprint
    dtype: str
    page_size: int
    head_start: int
    head_end: int
    quant: Quantization = Quantization()
    layout: str = "NHD"
    kv_split: bool = True
    rope_applied: bool = True
    version: int = FORMAT_VERSION
    unknown_fields: tuple[str, ...] = field(default=(), compare=True)  # names read from JSON we don't know

    # ------------------------------------------------------------------ validity
    def problems(self) -> list[str]:
        """Everything about this descriptor that this hetpd cannot interpret (empty when usable)."""
        out: list[str] = [f"unknown field {name!r}" for name in self.unknown_fields]
        if self.version != FORMAT_VERSION:
            out.append(f"version {self.version} (this hetpd reads version {FORMAT_VERSION})")
        if self.dtype not in ELEMENT_BITS:
            out.append(f"dtype {self.dtype!r} (known: {sorted(ELEMENT_BITS)})")
        if self.layout not in LAYOUTS:
            out.append(f"layout {self.layout!r} (known: {LAYOUTS})")
        if self.page_size < 1:
            out.append(f"page_size {self.page_size} (must be >= 1)")
        m = self.model
        if not 0 <= self.head_start < self.head_end <= m.num_kv_heads:
            out.append(f"head range [{self.head_start}, {self.head_end}) outside the model's {m.num_kv_heads} kv heads")
        out.extend(self._quant_problems())
        return out

    def _quant_problems(self) -> list[str]:
        q = self.quant
        if q.scale_location not in SCALE_LOCATIONS:
            return [f"scale_location {q.scale_location!r} (known: {SCALE_LOCATIONS})"]
        if self.dtype in FLOAT_DTYPES or self.dtype not in ELEMENT_BITS:
            return [] if q.scheme == "none" else [f"scheme {q.scheme!r} on float dtype {self.dtype} (use 'none')"]
        allowed = _SCHEMES_FOR[self.dtype]
        out = []
        if q.scheme not in allowed:
            out.append(f"scheme {q.scheme!r} for {self.dtype} (supported: {allowed})")
        if q.scale_dtype not in SCALE_BYTES:
            out.append(f"scale_dtype {q.scale_dtype!r} (known: {sorted(SCALE_BYTES)})")
        if q.scheme == "per_group":
            if q.group_size is None or q.group_size < 2 or self.model.head_dim % q.group_size:
                out.append(f"group_size {q.group_size} must be >= 2 and divide head_dim {self.model.head_dim}")
        elif q.group_size is not None:
            out.append(f"group_size is only meaningful with scheme 'per_group', not {q.scheme!r}")
        if q.zero_point and self.dtype != "int4":
            out.append("zero_point is only supported for int4")
        if q.scheme == "per_tensor" and q.scale_location != "separate":
            out.append("per_tensor scales live once per layer: scale_location must be 'separate'")
        if self.dtype == "int4" and self.model.head_dim % 2:
            out.append(f"int4 packs two elements per byte: head_dim {self.model.head_dim} must be even")
        return out

    # ------------------------------------------------------------------ sizes (pure arithmetic)
    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def quantised(self) -> bool:
        return self.quant.scheme != "none"

    def num_pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def scales_per_unit_token_head(self) -> int:
        """Scale values per (token, head) for token-wise schemes; 0 for none/per_tensor."""
        q = self.quant
        if q.scheme == "per_token_head":
            return 1
        if q.scheme == "per_group":
            assert q.group_size is not None
            return self.model.head_dim // q.group_size
        return 0

    def layer_bytes(self, num_tokens: int) -> int:
        """Bytes of one layer's K and V for ``num_tokens`` tokens (pages padded)."""
        slots = 2 * self.num_pages(num_tokens) * self.page_size * self.num_heads
        elements = slots * self.model.head_dim * ELEMENT_BITS[self.dtype] // 8
        if not self.quantised:
            return elements
        assert self.quant.scale_dtype is not None
        per_scale = SCALE_BYTES[self.quant.scale_dtype] * (2 if self.quant.zero_point else 1)
        if self.quant.scheme == "per_tensor":
            return elements + 2 * per_scale
        return elements + slots * self.scales_per_unit_token_head() * per_scale

    def payload_bytes(self, num_tokens: int, num_layers: int | None = None) -> int:
        layers = self.model.num_layers if num_layers is None else num_layers
        return layers * self.layer_bytes(num_tokens)

    def bytes_per_token(self) -> float:
        """Asymptotic wire bytes per token over all layers (page padding and per-tensor scales excluded)."""
        return self.payload_bytes(self.page_size) / self.page_size

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        raw = asdict(self)
        raw.pop("unknown_fields")
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVFormat:
        """Parse a descriptor. Unknown fields are kept by name (``problems()`` reports them)."""
        raw: dict[str, Any] = json.loads(text)
        unknown = [k for k in raw if k not in {f.name for f in fields(cls)} - {"unknown_fields"}]
        model_raw = dict(raw.get("model", {}))
        quant_raw = dict(raw.get("quant", {}))
        unknown += [f"model.{k}" for k in list(model_raw) if k not in {f.name for f in fields(ModelFingerprint)}]
        unknown += [f"quant.{k}" for k in list(quant_raw) if k not in {f.name for f in fields(Quantization)}]
        try:
            model = ModelFingerprint(**{k: v for k, v in model_raw.items() if "model." + k not in unknown})
            quant = Quantization(**{k: v for k, v in quant_raw.items() if "quant." + k not in unknown})
            known = {k: v for k, v in raw.items() if k not in unknown and k not in ("model", "quant")}
            return cls(model=model, quant=quant, unknown_fields=tuple(sorted(unknown)), **known)
        except TypeError as exc:  # a required field is missing
            raise IncompatibleKVError(f"KV format descriptor is incomplete: {exc}") from None

    def with_(self, **changes: Any) -> KVFormat:
        """A copy with some fields changed (``quant`` fields may be given by name too)."""
        quant_names = {f.name for f in fields(Quantization)}
        quant_changes = {k: changes.pop(k) for k in list(changes) if k in quant_names}
        if quant_changes:
            changes["quant"] = Quantization(**{**asdict(self.quant), **quant_changes})
        return KVFormat(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})
