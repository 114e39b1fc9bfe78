"""KV payload bytes <-> code tensors, for any :class:`KVFormat` layout (torch).

Tensors are token-major and layout-free: codes ``[layers, 2, T, heads, dim']`` (``dim'`` is
``dim // 2`` for int4) with scales/zeros shaped as :mod:`hetpd.kv.codec` says. The payload
is the byte layout the format's docstring defines; :func:`pack` and :func:`unpack` are exact
inverses for the first ``T`` tokens (page padding is zero and ignored on the way back).

Both directions work through strided *views* of the payload in token-major index order, so
packing is one copy into a fresh buffer and unpacking copies nothing it does not have to.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from hetpd.kv.codec import Encoded, KVCodec
from hetpd.kv.format import IncompatibleKVError, KVFormat
from hetpd.kv.state import Buffer



def codec_of(fmt: KVFormat) -> KVCodec:
    return KVCodec(fmt.dtype, fmt.quant)


class _Segments(NamedTuple):
    """Byte views ``[L, units, unit_bytes]`` of one payload's elements, scales and zeros."""

    elems: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None


def pack(encoded: Encoded, fmt: KVFormat) -> bytearray:
    """Lay ``encoded`` (``num_tokens`` = its T axis) out as ``fmt`` payload bytes."""
    num_layers, num_tokens = encoded.codes.shape[0], encoded.codes.shape[2]
    out = bytearray(fmt.payload_bytes(num_tokens, num_layers))  # zero-filled: page padding for free
    segments = _segments(torch.frombuffer(out, dtype=torch.uint8).view(num_layers, -1), fmt, num_tokens)
    codec = codec_of(fmt)
    _store(_paged(segments.elems, fmt, codec.storage_dtype, num_tokens), encoded.codes, fmt.page_size)
    for segment, values in ((segments.scales, encoded.scales), (segments.zeros, encoded.zeros)):
        if segment is None or values is None:
            continue
        if fmt.quant.scheme == "per_tensor":
            segment.view(num_layers, -1).copy_(values.reshape(num_layers, 2).to(codec.scale_torch_dtype).view(torch.uint8)
                                               .reshape(num_layers, -1))
        else:
            per_token = values if values.dim() == 5 else values.unsqueeze(-1)
            _store(_paged(segment, fmt, codec.scale_torch_dtype, num_tokens), per_token, fmt.page_size)
    return out


def unpack(payload: Buffer, fmt: KVFormat, num_tokens: int) -> Encoded:
    """Inverse of :func:`pack`. The payload may hold any whole number of layers (a streamed chunk)."""
    layer_bytes = fmt.layer_bytes(num_tokens)
    if len(payload) == 0 or len(payload) % layer_bytes:
        raise IncompatibleKVError(
            f"KV payload is {len(payload)} bytes, not a whole number of {layer_bytes}-byte layers of {fmt.dtype} "
            f"for {num_tokens} tokens: the descriptor does not describe these bytes")
    num_layers = len(payload) // layer_bytes
    with warnings.catch_warnings():  # read-only buffers are fine: nothing writes into these views
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(payload, dtype=torch.uint8).view(num_layers, layer_bytes)
    segments = _segments(raw, fmt, num_tokens)
    codec = codec_of(fmt)
    codes = _tokens(_paged(segments.elems, fmt, codec.storage_dtype, num_tokens), num_tokens)
    extras: list[torch.Tensor | None] = []
    for segment in (segments.scales, segments.zeros):
        if segment is None:
            extras.append(None)
        elif fmt.quant.scheme == "per_tensor":
            extras.append(_typed(segment.reshape(num_layers, -1), codec.scale_torch_dtype).reshape(num_layers, 2))
        else:
            values = _tokens(_paged(segment, fmt, codec.scale_torch_dtype, num_tokens), num_tokens)
            extras.append(values if fmt.quant.scheme == "per_group" else values.squeeze(-1))
    return Encoded(codes, extras[0], extras[1])


# ---------------------------------------------------------------------- helpers
def _segments(raw: torch.Tensor, fmt: KVFormat, num_tokens: int) -> _Segments:
    """Split ``[L, layer_bytes]`` into the byte views of elements, scales and zeros."""
    num_layers = raw.shape[0]
    codec = codec_of(fmt)
    pages = fmt.num_pages(num_tokens)
    units = 2 * pages if fmt.kv_split else pages
    kv_per_unit = 1 if fmt.kv_split else 2
    slots_per_unit = kv_per_unit * fmt.page_size * fmt.num_heads
    elem_unit = slots_per_unit * codec.storage_dim(fmt.model.head_dim) * codec.storage_dtype.itemsize
    if not codec.quantized:
        return _Segments(raw.view(num_layers, units, elem_unit), None, None)
    zero = fmt.quant.zero_point
    if fmt.quant.scheme == "per_tensor":
        scale_unit, units_with_scales = 2 * codec.scale_torch_dtype.itemsize, 1
    else:
        scale_unit = slots_per_unit * fmt.scales_per_unit_token_head() * codec.scale_torch_dtype.itemsize
        units_with_scales = units
    if fmt.quant.scale_location == "inline":
        grid = raw.view(num_layers, units, -1)
        return _Segments(grid[:, :, :elem_unit], grid[:, :, elem_unit:elem_unit + scale_unit],
                         grid[:, :, elem_unit + scale_unit:] if zero else None)
    scale_start = units * elem_unit
    zero_start = scale_start + units_with_scales * scale_unit
    elems = raw[:, :scale_start].view(num_layers, units, elem_unit)
    scales = raw[:, scale_start:zero_start].view(num_layers, units_with_scales, scale_unit)
    zeros = raw[:, zero_start:].view(num_layers, units_with_scales, scale_unit) if zero else None
    return _Segments(elems, scales, zeros)


def _typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret bytes (last axis) as ``dtype``; copies only when the bytes are misaligned for it."""
    try:
        return raw.view(dtype)
    except RuntimeError:  # a view needs aligned offsets and strides
        return raw.contiguous().view(dtype)


def _paged(unit_bytes: torch.Tensor, fmt: KVFormat, dtype: torch.dtype, num_tokens: int) -> torch.Tensor:
    """Byte units -> a typed view in token-major index order ``[L, 2, pages, page_size, heads, X]``."""
    num_layers, pages = unit_bytes.shape[0], fmt.num_pages(num_tokens)
    typed = _typed(unit_bytes, dtype)
    inner = (fmt.num_heads, fmt.page_size) if fmt.layout == "HND" else (fmt.page_size, fmt.num_heads)
    outer = (2, pages) if fmt.kv_split else (pages, 2)
    view = typed.reshape(num_layers, *outer, *inner, -1)
    if not fmt.kv_split:
        view = view.transpose(1, 2)
    return view.transpose(3, 4) if fmt.layout == "HND" else view


def _store(paged: torch.Tensor, tokens: torch.Tensor, page_size: int) -> None:
    """Copy token-major ``[L, 2, T, heads, X]`` into a paged view (full pages, then the partial one)."""
    num_tokens = tokens.shape[2]
    full = num_tokens // page_size
    tokens = tokens.to(paged.dtype)
    if full:
        paged[:, :, :full].copy_(tokens[:, :, :full * page_size].reshape(*tokens.shape[:2], full, page_size,
                                                                         *tokens.shape[3:]))
    rest = num_tokens - full * page_size
    if rest:
        paged[:, :, full, :rest].copy_(tokens[:, :, full * page_size:])


def _tokens(paged: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A paged view -> token-major ``[L, 2, T, heads, X]`` (a view when the layout allows)."""
    return paged.flatten(2, 3)[:, :, :num_tokens]
