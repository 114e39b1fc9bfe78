"""Paged attention over a mixed batch of prefill chunks and decode tokens.

The batch's new tokens are flat ([T, ...]). Sequences are split into at most a few groups of
similar context length; each group's whole context (cached tokens plus this step's) is gathered
from the pool into a padded [B, max_context] view and served by one masked SDPA call. Grouping
keeps a short sequence from paying for the longest one's padding.

Grouped-query attention is computed by folding each KV head's group of query heads into the
query axis ([B, kv_heads, group * Q, D]), so K and V are never repeated per query head
(SDPA's ``enable_gqa`` repeats them on CPU, which costs 5x in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetpd.engine.kv_cache import PagedKVCache


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose new tokens are flat rows ``[token_start, token_end)`` of the batch.

    context_slots: [B * C] pool slot of each context position, row-major (padding: slot 0).
    mask: [B, 1, gqa_group * Q, C] True where a query row may attend to a context position; rows
        are (query-head-in-group, query position), matching the fold in :func:`paged_attention`.
    query_index: [tokens] position of each of the group's tokens in its padded [B * Q] query
        grid, or None when every sequence has exactly one new token (the grid is the group).
    """

    token_start: int
    token_end: int
    context_slots: torch.Tensor
    mask: torch.Tensor
    query_index: torch.Tensor | None
    batch_size: int
    max_query_len: int
    max_context_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step index tensors, built once and shared by every layer.

    slot_mapping: [T] pool slot each new token's K/V is written to. groups: contiguous ranges of
    the batch's tokens, in order, covering all T."""

    slot_mapping: torch.Tensor
    groups: tuple[AttentionGroup, ...]


def paged_attention(q: torch.Tensor, kv_cache: PagedKVCache, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, D] new queries (their K/V already written to the pool). Returns [T, heads * D].

    Query head h reads KV head ``h // (heads // kv_heads)``, as in HF."""
    outputs = [_group_attention(q[g.token_start : g.token_end], kv_cache, layer, g) for g in meta.groups]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _group_attention(q: torch.Tensor, kv_cache: PagedKVCache, layer: int, group: AttentionGroup) -> torch.Tensor:
    _, num_heads, head_dim = q.shape
    batch, max_query, max_context = group.batch_size, group.max_query_len, group.max_context_len
    kv_heads = kv_cache.num_kv_heads
    fold = num_heads // kv_heads
    k, v = kv_cache.read(layer, group.context_slots, q.dtype)
    k = k.view(batch, max_context, kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, max_context, kv_heads, head_dim).transpose(1, 2)
    if group.query_index is None:
        padded = q.reshape(batch, 1, num_heads, head_dim)
    else:
        padded = q.new_zeros(batch * max_query, num_heads, head_dim)
        padded[group.query_index] = q
        padded = padded.view(batch, max_query, num_heads, head_dim)
    folded = padded.view(batch, max_query, kv_heads, fold, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(batch, kv_heads, fold * max_query, head_dim)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=group.mask)
    out = out.view(batch, kv_heads, fold, max_query, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch * max_query, num_heads * head_dim)
    return out if group.query_index is None else out[group.query_index]
