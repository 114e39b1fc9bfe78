"""A request's exported KV: bytes plus the format descriptor and the request metadata.

This is the object that crosses the prefill/decode boundary (the seed of the Runtime KV
State). It holds plain ``bytes`` so any transport can move it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetpd.kv.format import IncompatibleKVError, KVFormat
from hetpd.kv.quant import KVCodec, codec_for


@dataclass(frozen=True)
class KVExport:
    """KV of tokens ``[0, num_tokens)`` of a request, produced by a prefill-role engine.

    ``token_ids`` holds the prompt and the first sampled token (``num_tokens + 1`` ids): the
    consumer continues from there. ``first_token_logprob`` is set when logprobs were asked.
    """

    request_id: str
    format: KVFormat
    num_tokens: int
    token_ids: tuple[int, ...]
    data: bytes
    scales: bytes | None
    first_token_logprob: float | None = None

    @property
    def num_pages(self) -> int:
        return -(-self.num_tokens // self.format.page_size)

    @property
    def nbytes(self) -> int:
        return len(self.data) + (len(self.scales) if self.scales is not None else 0)


def pack(tensor: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (any dtype), C order."""
    return bytes(tensor.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def unpack_tokens(export: KVExport) -> tuple[torch.Tensor, torch.Tensor | None, KVCodec]:
    """The export's KV as token-major tensors, still in the producer's codec.

    Returns data ``[layers, 2, num_tokens, heads, head_dim]`` (storage dtype), scales
    ``[layers, 2, num_tokens, heads]`` or None, and the producer's codec. Re-paging to the
    consumer's page size is then just writing tokens into its own slots."""
    fmt = export.format
    if fmt.layout != "NHD" or not fmt.kv_split:
        raise IncompatibleKVError(f"layout {fmt.layout} (kv_split={fmt.kv_split}) is not readable here; expected NHD split")
    codec = codec_for(fmt.dtype)
    heads = fmt.head_end - fmt.head_start
    page_shape = (fmt.num_layers, 2, export.num_pages, fmt.page_size, heads)
    expected = int(np.prod(page_shape)) * fmt.head_dim * codec.element_bytes
    if len(export.data) != expected:
        raise IncompatibleKVError(f"KV data is {len(export.data)} bytes, format says {expected}")
    raw = torch.frombuffer(bytearray(export.data), dtype=torch.uint8).view(codec.storage_dtype)
    data = raw.view(*page_shape, fmt.head_dim).flatten(2, 3)[:, :, : export.num_tokens]
    scales = None
    if codec.quantized:
        if export.scales is None or fmt.scale_scheme != "per_token_head" or fmt.scale_dtype != "float32":
            raise IncompatibleKVError(f"{fmt.dtype} KV needs per_token_head float32 scales; got {fmt.scale_scheme}")
        scales = torch.frombuffer(bytearray(export.scales), dtype=torch.float32).view(page_shape).flatten(2, 3)
        scales = scales[:, :, : export.num_tokens]
    return data, scales, codec
