"""Load an HF-format folder's safetensors weights into :class:`LlamaModel`.

HF keeps q/k/v and gate/up as separate matrices; we fuse them at load time. Weight
precision is chosen here: float32 or bfloat16, or int8 weight-only (per output channel)
with activations in the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from hetpd.models.config import ModelConfig
from hetpd.models.linear import Int8Linear, PrepackedLinear, swap_linears
from hetpd.models.llama import LlamaModel

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = (None, "int8")


class MissingWeightError(ValueError):
    pass


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {model_dir} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise MissingWeightError(f"weight {name!r} is missing from the checkpoint")
    return tensors[name]


def _fused(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([_take(tensors, name) for name in names], dim=0)


def hf_to_hetpd_state_dict(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse HF weights into this package's module names."""
    out: dict[str, torch.Tensor] = {
        "embed_tokens.weight": _take(tensors, "model.embed_tokens.weight"),
        "norm.weight": _take(tensors, "model.norm.weight"),
    }
    out["lm_head.weight"] = out["embed_tokens.weight"] if config.tie_word_embeddings else _take(tensors, "lm_head.weight")
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        out[ours + "self_attn.qkv_proj.weight"] = _fused(tensors, [attn + f"{p}_proj.weight" for p in "qkv"])
        if config.attention_bias:
            out[ours + "self_attn.qkv_proj.bias"] = _fused(tensors, [attn + f"{p}_proj.bias" for p in "qkv"])
        out[ours + "self_attn.o_proj.weight"] = _take(tensors, attn + "o_proj.weight")
        if config.o_proj_bias:
            out[ours + "self_attn.o_proj.bias"] = _take(tensors, attn + "o_proj.bias")
        if config.qk_norm:
            out[ours + "self_attn.q_norm.weight"] = _take(tensors, attn + "q_norm.weight")
            out[ours + "self_attn.k_norm.weight"] = _take(tensors, attn + "k_norm.weight")
        mlp = hf + "mlp."
        out[ours + "mlp.gate_up_proj.weight"] = _fused(tensors, [mlp + "gate_proj.weight", mlp + "up_proj.weight"])
        out[ours + "mlp.down_proj.weight"] = _take(tensors, mlp + "down_proj.weight")
        if config.mlp_bias:
            out[ours + "mlp.gate_up_proj.bias"] = _fused(tensors, [mlp + "gate_proj.bias", mlp + "up_proj.bias"])
            out[ours + "mlp.down_proj.bias"] = _take(tensors, mlp + "down_proj.bias")
        out[ours + "input_layernorm.weight"] = _take(tensors, hf + "input_layernorm.weight")
        out[ours + "post_attention_layernorm.weight"] = _take(tensors, hf + "post_attention_layernorm.weight")
    return out


def load_model(
    model_dir: Path,
    config: ModelConfig,
    *,
    dtype: str,
    quantization: str | None,
    device: torch.device,
    max_positions: int,
) -> LlamaModel:
    """Build the model on ``device`` with weights in ``dtype`` (optionally int8 weight-only)."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(WEIGHT_DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; choose one of {QUANTIZATIONS}")
    torch_dtype = WEIGHT_DTYPES[dtype]
    state = hf_to_hetpd_state_dict(config, read_safetensors(model_dir))
    with torch.device("meta"):
        model = LlamaModel(config, max_positions)
    expected = set(model.state_dict().keys())
    if config.tie_word_embeddings:
        expected.add("lm_head.weight")
    unexpected = set(state) - expected
    if unexpected:
        raise MissingWeightError(f"checkpoint has weights hetpd does not use: {sorted(unexpected)[:5]}")
    cast = {name: tensor.to(device=device, dtype=torch_dtype) for name, tensor in state.items()}
    if config.tie_word_embeddings:
        cast["lm_head.weight"] = cast["embed_tokens.weight"]
    model.load_state_dict(cast, strict=True, assign=True)
    # The RoPE tables were built on the meta device; rebuild them for real.
    real = LlamaModel.rope_tables(config, max_positions)
    model.rope_cos, model.rope_sin = real[0].to(device), real[1].to(device)
    if quantization == "int8":
        swap_linears(model, lambda w, b: Int8Linear(w, b, torch_dtype), include_lm_head=False)
    if PrepackedLinear.supported(device, torch_dtype):
        # The tied lm_head gets its own packed copy; the embedding keeps the plain weight.
        swap_linears(model, PrepackedLinear, include_lm_head=True)
    return model.eval()
