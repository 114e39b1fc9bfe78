"""KV format descriptor: what the bytes of an exported KV cache mean. Pure Python.

Transfer engines move bytes, not tensors; this descriptor travels with them so the other
side can tell whether it can use them as is, convert them, or must refuse.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

FORMAT_VERSION = 1


class IncompatibleKVError(ValueError):
    """The producer's KV cannot be used by this consumer; the message names the fields."""


@dataclass(frozen=True)
class KVFormat:
    """Layout of exported KV bytes.

    ``data``: ``[num_layers, 2 (K, V), num_pages, page_size, num_kv_heads, head_dim]`` elements of
    ``dtype`` (layout ``NHD`` per page, K and V split). ``scales`` (quantised dtypes only):
    ``[num_layers, 2, num_pages, page_size, num_kv_heads]`` of ``scale_dtype``, one per token
    per head. RoPE is already applied to K. Heads ``[head_start, head_end)`` of the model.
    """

    model_fingerprint: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    head_start: int
    head_end: int
    scale_scheme: str = "none"  # "none" | "per_token_head"
    scale_dtype: str | None = None
    layout: str = "NHD"
    kv_split: bool = True
    rope_applied: bool = True
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVFormat:
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            # Never guess what an unknown field means.
            raise IncompatibleKVError(f"KV format has fields this hetpd does not know: {sorted(unknown)}")
        if raw.get("version") != FORMAT_VERSION:
            raise IncompatibleKVError(f"KV format version {raw.get('version')} is not {FORMAT_VERSION}")
        return cls(**raw)

    def shape_mismatches(self, other: KVFormat) -> list[str]:
        """Fields that must be equal for two sides' KV to mean the same thing (no conversion fixes them)."""
        names = ("model_fingerprint", "architecture", "num_layers", "num_kv_heads", "head_dim", "head_start", "head_end",
                 "rope_applied")
        return [f"{n}: {getattr(self, n)!r} vs {getattr(other, n)!r}" for n in names if getattr(self, n) != getattr(other, n)]
