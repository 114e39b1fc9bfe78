"""Paged attention over a mixed batch of prefill chunks and decode tokens.

The batch's new tokens are flat ([T, ...]); each sequence's whole context (cached tokens
plus this step's) is gathered from the pool into a padded [B, max_context] view. One
masked SDPA call then serves every sequence; padding is masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step index tensors, built once and shared by every layer.

    slot_mapping: [T] pool slot each new token's K/V is written to.
    context_slots: [B, C] pool slot of each context position (padding points at slot 0).
    mask: [B, 1, Q, C] True where query q of sequence b may attend to context position c.
    query_index: [T] position of each flat token in the padded [B * Q] query grid, or None
        when every sequence has exactly one new token (pure decode: the grid is the batch).
    """

    slot_mapping: torch.Tensor
    context_slots: torch.Tensor
    mask: torch.Tensor
    query_index: torch.Tensor | None
    max_query_len: int


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, D] new queries; k, v: [B, C, kv_heads, D] gathered context.

    Returns [T, heads * D]. Grouped-query attention is handled by SDPA's ``enable_gqa``.
    """
    num_tokens, num_heads, head_dim = q.shape
    batch, max_query = meta.mask.shape[0], meta.max_query_len
    if meta.query_index is None:
        padded = q.view(batch, 1, num_heads, head_dim)
    else:
        padded = q.new_zeros(batch * max_query, num_heads, head_dim)
        padded[meta.query_index] = q
        padded = padded.view(batch, max_query, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.mask, enable_gqa=True
    )
    out = out.transpose(1, 2).reshape(batch * max_query, num_heads * head_dim)
    return out if meta.query_index is None else out[meta.query_index]
