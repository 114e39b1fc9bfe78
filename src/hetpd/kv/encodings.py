"""Named KV encodings: short names for a dtype plus its scale scheme. Pure Python.

Deployment files, the planner and the docs' verdict table say ``int8-token-f32`` rather than
spelling out a :class:`Quantization`. Every encoding hetpd can read or write is listed here.
"""

from __future__ import annotations

from hetpd.kv.format import KVFormat, ModelFingerprint, Quantization

ENCODINGS: dict[str, tuple[str, Quantization]] = {
    "fp32": ("float32", Quantization()),
    "bf16": ("bfloat16", Quantization()),
    "fp16": ("float16", Quantization()),
    "int8-token-f32": ("int8", Quantization("per_token_head", "float32")),  # hetpd's int8 KV cache
    "int8-token-f16": ("int8", Quantization("per_token_head", "float16")),
    "int8-tensor-f32": ("int8", Quantization("per_tensor", "float32")),
    "fp8-token-f32": ("fp8_e4m3", Quantization("per_token_head", "float32")),  # hetpd's fp8 KV cache
    "fp8-token-bf16": ("fp8_e4m3", Quantization("per_token_head", "bfloat16")),
    "fp8-tensor-f32": ("fp8_e4m3", Quantization("per_tensor", "float32")),  # vLLM's fp8 KV (k_scale, v_scale)
    "int4-g32-f16": ("int4", Quantization("per_group", "float16", group_size=32)),
    "int4-g16z-f16": ("int4", Quantization("per_group", "float16", group_size=16, zero_point=True)),
    "int4-g8z-bf16": ("int4", Quantization("per_group", "bfloat16", group_size=8, zero_point=True)),
}


def encoding(name: str) -> tuple[str, Quantization]:
    """The (dtype, quantization) of a named encoding; unknown names list the choices."""
    if name not in ENCODINGS:
        raise ValueError(f"KV encoding {name!r} is unknown; choose one of {sorted(ENCODINGS)}")
    return ENCODINGS[name]


def format_for(model: ModelFingerprint, name: str, page_size: int = 16, **changes: object) -> KVFormat:
    """A whole-model (all heads) format in a named encoding; ``changes`` override any field."""
    dtype, quant = encoding(name)
    base = KVFormat(model, dtype, page_size=page_size, head_start=0, head_end=model.num_kv_heads, quant=quant)
    return base.with_(**changes) if changes else base
