"""Engine configuration: one frozen record, validated on construction, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hetpd.kv.format import canonical_kv_dtype

Role = Literal["colocated", "prefill", "decode"]
ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class EngineConfig:
    """What one engine runs and how; names follow vLLM's engine arguments.

    ``model`` is an HF-format folder (None: the embedded SmolLM2-135M-Instruct).
    ``dtype`` is the weight and activation dtype; ``quantization="int8"`` stores the
    projection weights as int8 (per output channel) and computes in ``dtype``.
    ``kv_cache_dtype="auto"`` keeps KV in ``dtype``. The pool holds ``num_kv_blocks`` pages
    of ``block_size`` tokens, or as many as fit in ``kv_cache_memory_bytes``.
    ``role`` picks the engine's side of a disaggregated deployment.
    """

    model: str | None = None
    role: Role = "colocated"
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.kv_cache_dtype != "auto":
            canonical_kv_dtype(self.kv_cache_dtype)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    @property
    def resolved_kv_cache_dtype(self) -> str:
        return self.dtype if self.kv_cache_dtype == "auto" else canonical_kv_dtype(self.kv_cache_dtype)
