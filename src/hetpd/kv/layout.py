"""KV payload bytes <-> code tensors, for any :class:`KVFormat` layout (torch).

Tensors are token-major and layout-free: codes ``[layers, 2, T, heads, dim']`` (``dim'`` is
``dim // 2`` for int4) with scales/zeros shaped as :mod:`hetpd.kv.codec` says. The payload
is the byte layout the format's docstring defines; :func:`pack` and :func:`unpack` are exact
inverses for the first ``T`` tokens (page padding is zero-filled and ignored on the way back).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from hetpd.kv.codec import Encoded, KVCodec
from hetpd.kv.format import IncompatibleKVError, KVFormat

Buffer = bytes | bytearray | memoryview


def codec_of(fmt: KVFormat) -> KVCodec:
    return KVCodec(fmt.dtype, fmt.quant)


def pack(encoded: Encoded, fmt: KVFormat) -> bytes:
    """Lay ``encoded`` (``num_tokens`` = its T axis) out as ``fmt`` payload bytes."""
    codes = encoded.codes
    num_layers, num_tokens = codes.shape[0], codes.shape[2]
    parts = [_unit_bytes(codes, fmt, num_tokens)]
    for extra in (encoded.scales, encoded.zeros):
        if extra is None:
            continue
        if fmt.quant.scheme == "per_tensor":
            parts.append(_bytes(extra.reshape(num_layers, 2)).reshape(num_layers, 1, -1))
        else:
            parts.append(_unit_bytes(extra if extra.dim() == 5 else extra.unsqueeze(-1), fmt, num_tokens))
    if fmt.quant.scale_location == "inline" and len(parts) > 1:
        layers = torch.cat(parts, dim=2).flatten(1)
    else:
        layers = torch.cat([p.flatten(1) for p in parts], dim=1)
    out = layers.contiguous().numpy().tobytes()
    assert len(out) == fmt.payload_bytes(num_tokens, num_layers), "pack disagrees with KVFormat.layer_bytes"
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
    codec = codec_of(fmt)
    pages = fmt.num_pages(num_tokens)
    units = 2 * pages if fmt.kv_split else pages
    dim = codec.storage_dim(fmt.model.head_dim)
    elem_unit = _elem_unit_bytes(fmt, codec, dim)
    scale_unit = 0
    if fmt.quant.scheme not in ("none", "per_tensor"):
        scale_unit = (1 if fmt.kv_split else 2) * fmt.page_size * fmt.num_heads * \
            fmt.scales_per_unit_token_head() * codec.scale_torch_dtype.itemsize
    if fmt.quant.scale_location == "inline" and scale_unit:
        per_unit = elem_unit + scale_unit * (2 if fmt.quant.zero_point else 1)
        grid = raw.view(num_layers, units, per_unit)
        elems, scale_bytes = grid[:, :, :elem_unit], grid[:, :, elem_unit:elem_unit + scale_unit]
        zero_bytes = grid[:, :, elem_unit + scale_unit:] if fmt.quant.zero_point else None
    else:
        elems = raw[:, : units * elem_unit]
        rest = raw[:, units * elem_unit:]
        half = rest.shape[1] // 2 if fmt.quant.zero_point else rest.shape[1]
        scale_bytes, zero_bytes = rest[:, :half], (rest[:, half:] if fmt.quant.zero_point else None)
    codes = _from_unit_bytes(elems, fmt, codec.storage_dtype, dim, num_tokens)
    if not codec.quantized:
        return Encoded(codes, None, None)
    return Encoded(codes, _scales_from_bytes(scale_bytes, fmt, codec, num_tokens),
                   None if zero_bytes is None else _scales_from_bytes(zero_bytes, fmt, codec, num_tokens))


# ---------------------------------------------------------------------- helpers
def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _to_pages(t: torch.Tensor, fmt: KVFormat, num_tokens: int) -> torch.Tensor:
    """[L, 2, T, H, X] -> per-unit order: [L, 2, P, page(,H swapped), X] or joint [L, P, 2, ...]."""
    pad = fmt.num_pages(num_tokens) * fmt.page_size - num_tokens
    if pad:
        t = F.pad(t, (0, 0, 0, 0, 0, pad))
    t = t.reshape(*t.shape[:2], -1, fmt.page_size, *t.shape[3:])  # [L, 2, P, page, H, X]
    if fmt.layout == "HND":
        t = t.transpose(3, 4)
    if not fmt.kv_split:
        t = t.transpose(1, 2)
    return t


def _unit_bytes(t: torch.Tensor, fmt: KVFormat, num_tokens: int) -> torch.Tensor:
    """Per-token tensor -> [L, units, bytes per unit]."""
    paged = _to_pages(t, fmt, num_tokens).contiguous()
    units = paged.shape[1] * paged.shape[2] if fmt.kv_split else paged.shape[1]
    return _bytes(paged).reshape(paged.shape[0], units, -1)


def _elem_unit_bytes(fmt: KVFormat, codec: KVCodec, dim: int) -> int:
    per_page = fmt.page_size * fmt.num_heads * dim * codec.storage_dtype.itemsize
    return per_page if fmt.kv_split else 2 * per_page


def _from_pages(t: torch.Tensor, fmt: KVFormat, num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`_to_pages`: -> [L, 2, T, H, X]."""
    if not fmt.kv_split:
        t = t.transpose(1, 2)
    if fmt.layout == "HND":
        t = t.transpose(3, 4)
    return t.flatten(2, 3)[:, :, :num_tokens]


def _from_unit_bytes(raw: torch.Tensor, fmt: KVFormat, dtype: torch.dtype, last: int, num_tokens: int) -> torch.Tensor:
    num_layers, pages = raw.shape[0], fmt.num_pages(num_tokens)
    typed = raw.contiguous().view(dtype)
    inner = (fmt.num_heads, fmt.page_size) if fmt.layout == "HND" else (fmt.page_size, fmt.num_heads)
    outer = (2, pages) if fmt.kv_split else (pages, 2)
    return _from_pages(typed.reshape(num_layers, *outer, *inner, last), fmt, num_tokens)


def _scales_from_bytes(raw: torch.Tensor, fmt: KVFormat, codec: KVCodec, num_tokens: int) -> torch.Tensor:
    if fmt.quant.scheme == "per_tensor":
        return raw.contiguous().view(codec.scale_torch_dtype).reshape(raw.shape[0], 2)
    groups = fmt.scales_per_unit_token_head()
    scales = _from_unit_bytes(raw, fmt, codec.scale_torch_dtype, groups, num_tokens)
    return scales if fmt.quant.scheme == "per_group" else scales.squeeze(-1)
