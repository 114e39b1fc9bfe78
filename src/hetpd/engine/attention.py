"""Paged attention over a mixed batch of prefill chunks and decode tokens.

The batch's new tokens are flat ([T, ...]); each sequence's whole context (cached tokens
plus this step's) is gathered from the pool into a padded [B, max_context] view. One
masked SDPA call then serves every sequence; padding is masked out.

Grouped-query attention is computed by folding each KV head's group of query heads into
the query axis ([B, kv_heads, group * Q, D]), so K and V are never repeated per query head
(SDPA's ``enable_gqa`` repeats them on CPU, which costs 5x in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step index tensors, built once and shared by every layer.

    slot_mapping: [T] pool slot each new token's K/V is written to.
    context_slots: [B * C] pool slot of each context position, row-major (padding: slot 0).
    mask: [B, 1, group * Q, C] True where a query row may attend to a context position; rows
        are (query-head-in-group, query position), matching :func:`paged_attention`'s fold.
    query_index: [T] position of each flat token in the padded [B * Q] query grid, or None
        when every sequence has exactly one new token (pure decode: the grid is the batch).
    """

    slot_mapping: torch.Tensor
    context_slots: torch.Tensor
    mask: torch.Tensor
    query_index: torch.Tensor | None
    batch_size: int
    max_query_len: int
    max_context_len: int


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, D] new queries; k, v: [B, C, kv_heads, D] gathered context.

    Returns [T, heads * D]. Query head h reads KV head ``h // (heads // kv_heads)``, as in HF.
    """
    num_tokens, num_heads, head_dim = q.shape
    batch, max_query = meta.batch_size, meta.max_query_len
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    if meta.query_index is None:
        padded = q.reshape(batch, 1, num_heads, head_dim)
    else:
        padded = q.new_zeros(batch * max_query, num_heads, head_dim)
        padded[meta.query_index] = q
        padded = padded.view(batch, max_query, num_heads, head_dim)
    folded = padded.view(batch, max_query, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(batch, kv_heads, group * max_query, head_dim)
    out = F.scaled_dot_product_attention(folded, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.mask)
    out = out.view(batch, kv_heads, group, max_query, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch * max_query, num_heads * head_dim)
    return out if meta.query_index is None else out[meta.query_index]
