"""Execute a representation conversion with torch (the consumer or producer side of a verdict)."""

from __future__ import annotations

import torch

from hetpd.kv.check import check
from hetpd.kv.codec import Encoded
from hetpd.kv.format import IncompatibleKVError, KVFormat
from hetpd.kv.layout import codec_of, pack, unpack
from hetpd.kv.state import Buffer


def convert(encoded: Encoded, source: KVFormat, target: KVFormat) -> tuple[Encoded, KVFormat]:
    """Re-encode ``source``-format codes into ``target``'s encoding, on the heads both cover.

    Returns the codes and the format they are in: ``target`` narrowed to the shared head range
    (a tensor-parallel shard supplies only its heads; the consumer merges shards by head).
    Identical encodings pass through untouched; otherwise values are decoded to float32 and
    re-encoded, so the only loss is the target encoding's own rounding.
    """
    verdict = check(source, target)
    if not verdict.usable or verdict.heads is None:
        raise IncompatibleKVError("cannot convert KV: " + verdict.explain())
    start, end = verdict.heads
    codes, scales, zeros = encoded
    if (start, end) != (source.head_start, source.head_end):
        lo, hi = start - source.head_start, end - source.head_start
        codes = codes[:, :, :, lo:hi]
        if source.quant.scheme != "per_tensor":  # a tensor-wide scale still covers any subset of heads
            scales = None if scales is None else scales[:, :, :, lo:hi]
            zeros = None if zeros is None else zeros[:, :, :, lo:hi]
    out_format = target.with_(head_start=start, head_end=end)
    if "dequantise" not in verdict.steps and "quantise" not in verdict.steps and "cast" not in verdict.steps:
        return Encoded(codes, scales, zeros), out_format
    values = codec_of(source).decode(codes, scales, torch.float32, zeros)
    if target.dtype == "float16" and values.abs().max() > torch.finfo(torch.float16).max:
        raise IncompatibleKVError("KV values exceed the float16 range (65504): use bfloat16 or float32 on the consumer")
    return codec_of(target).encode(values), out_format


def convert_payload(payload: Buffer, source: KVFormat, target: KVFormat, num_tokens: int) -> tuple[bytearray, KVFormat]:
    """Bytes in ``source`` format -> bytes in ``target`` format (narrowed to the shared heads)."""
    encoded, out_format = convert(unpack(payload, source, num_tokens), source, target)
    return pack(encoded, out_format), out_format
