"""Model shape and options read from an HF ``config.json``. Pure Python, no torch.

Supports the Llama family as HF writes it (both the v4 ``rope_theta``/``rope_scaling`` keys
and the v5 ``rope_parameters`` block). Anything we do not implement is refused by name,
never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something hetpd does not implement; the message names it."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q, k, v projections (Qwen2 always; Llama optional)
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the KV cache's meaning (not the weights)."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model folder {model_dir} has no config.json (expected an HF-format folder)")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or []
        architecture = architectures[0] if architectures else _architecture_from_model_type(raw.get("model_type"))
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {architecture!r} is not supported; hetpd runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = _require(raw, "hidden_size")
        heads = _require(raw, "num_attention_heads")
        head_dim = raw.get("head_dim") or hidden // heads
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        is_qwen3 = architecture == "Qwen3ForCausalLM"
        sliding_window = None
        if architecture == "MistralForCausalLM":
            sliding_window = raw.get("sliding_window")
        elif (is_qwen2 or is_qwen3) and raw.get("use_sliding_window"):
            raise UnsupportedModelError(f"{architecture} with use_sliding_window=true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=architecture,
            vocab_size=_require(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(raw, "intermediate_size"),
            num_layers=_require(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_rope_config(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or bool(raw.get("attention_bias", False)),
            o_proj_bias=(not is_qwen2) and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=is_qwen3,
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _architecture_from_model_type(model_type: Any) -> str:
    names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    if model_type not in names:
        raise UnsupportedModelError(f"config.json has no 'architectures' and model_type {model_type!r} is not supported")
    return names[model_type]


def _require(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise UnsupportedModelError(f"config.json is missing required field {key!r}")
    return int(raw[key])


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    # transformers v5 nests everything in rope_parameters; v4 used rope_theta + rope_scaling.
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling: dict[str, Any] = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(merged.get("rope_type", merged.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; hetpd implements {SUPPORTED_ROPE_TYPES}")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )
