"""The paged KV pool: preallocated K and V pages for every layer, in one codec.

Layout is NHD per page (token, head, dim), K and V split, one slot per token:
``data[layer, 0 or 1, block * block_size + offset, head, dim]``. Quantised codecs add
``scales[layer, 0 or 1, slot, head]`` (float32, one per token per head).
"""

from __future__ import annotations

import torch

from hetpd.kv.codec import KVCodec


class PagedKVCache:
    """Owns the KV tensors; which block belongs to whom is the allocator's business."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        codec: KVCodec,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.codec = codec
        self.device = device
        num_slots = num_blocks * block_size
        self.data = torch.zeros(num_layers, 2, num_slots, num_kv_heads, head_dim, dtype=codec.storage_dtype, device=device)
        self.scales: torch.Tensor | None = (
            torch.ones(num_layers, 2, num_slots, num_kv_heads, dtype=torch.float32, device=device)
            if codec.quantized
            else None
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, codec: KVCodec) -> int:
        per_token_head = codec.storage_dim(head_dim) * codec.storage_dtype.itemsize + (4 if codec.quantized else 0)
        return 2 * num_layers * block_size * num_kv_heads * per_token_head

    def slots_of(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        """Pool slots of the first ``num_tokens`` positions of a sequence holding ``blocks``."""
        positions = torch.arange(num_tokens)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[positions // self.block_size] * self.block_size + positions % self.block_size).to(self.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new tokens' K and V ([T, kv_heads, head_dim]) at ``slots`` ([T])."""
        k_data, k_scale, _ = self.codec.encode(k)
        v_data, v_scale, _ = self.codec.encode(v)
        self.data[layer, 0].index_copy_(0, slots, k_data)
        self.data[layer, 1].index_copy_(0, slots, v_data)
        if self.scales is not None:
            assert k_scale is not None and v_scale is not None
            self.scales[layer, 0].index_copy_(0, slots, k_scale)
            self.scales[layer, 1].index_copy_(0, slots, v_scale)

    def read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``slots`` ([S], flat) as ``dtype``: two tensors [S, kv_heads, head_dim]."""
        # index_select on one dim is a plain gather; advanced indexing costs ~1.5x more here.
        kv = self.data[layer].index_select(1, slots)
        scales = self.scales[layer].index_select(1, slots) if self.scales is not None else None
        if scales is None and kv.dtype == dtype:
            return kv[0], kv[1]
        k = self.codec.decode(kv[0], None if scales is None else scales[0], dtype)
        v = self.codec.decode(kv[1], None if scales is None else scales[1], dtype)
        return k, v

    def read_tokens(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored elements [layers, 2, T, heads, dim] and scales [layers, 2, T, heads] (or None) at ``slots``."""
        return self.data[:, :, slots], None if self.scales is None else self.scales[:, :, slots]

    def write_tokens(self, slots: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Store already-encoded elements (this cache's codec) at ``slots``: the import path."""
        self.data[:, :, slots] = data.to(self.device)
        if self.scales is not None:
            assert scales is not None, f"{self.codec.name} KV needs scales"
            self.scales[:, :, slots] = scales.to(self.device)
