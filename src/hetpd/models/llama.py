"""The Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache, in one file.

Differences between the four are switches on :class:`ModelConfig`: Qwen2's q/k/v bias,
Qwen3's per-head q/k RMSNorm, Mistral's sliding window (applied in the attention mask),
llama3 RoPE scaling, tied embeddings. Tokens arrive flat ([T]) with their positions; the
attention metadata says where their K/V go in the pool and what each may attend to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hetpd.engine.attention import AttentionMetadata, paged_attention
from hetpd.engine.kv_cache import PagedKVCache
from hetpd.models.config import ModelConfig, RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (float32, [head_dim // 2]) with the configured scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention). x: [T, heads, D]; cos, signed_sin: [T, 1, D].

    HF computes ``x * cos + cat(-x2, x1) * sin``; with ``signed_sin = cat(-sin1, sin2)`` that is
    ``x * cos + roll(x, D/2) * signed_sin``: the same products, bit for bit, in fewer kernels.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        # q, k and v fused into one matmul: fewer kernel launches per layer.
        self.qkv_proj: nn.Module = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj: nn.Module = nn.Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: PagedKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x).view(num_tokens, heads + 2 * self.num_kv_heads, self.head_dim)
        qk, v = qkv[:, : heads + self.num_kv_heads], qkv[:, heads + self.num_kv_heads :]
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = apply_rope(qk, cos, sin)  # q and k heads are adjacent: one rotation for both
        q, k = qk[:, :heads], qk[:, heads:]
        kv_cache.write(self.layer_index, k, v, meta.slot_mapping)
        out: torch.Tensor = self.o_proj(paged_attention(q, kv_cache, self.layer_index, meta))
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj: nn.Module = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj: nn.Module = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        out: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: PagedKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head; logits only where asked."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Module = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = self.rope_tables(config, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def rope_tables(config: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see :func:`apply_rope`), float32 [max_positions, head_dim],
        from the same fp32 outer product HF uses."""
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config.rope, config.head_dim))
        return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-angles.sin(), angles.sin()), dim=-1)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (normed) for the flat batch of new tokens."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, meta)
        out: torch.Tensor = self.norm(x)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden)
        return logits.float()
