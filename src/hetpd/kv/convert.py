"""Convert KV elements between codecs (the consumer side of a format mismatch)."""

from __future__ import annotations

import torch

from hetpd.kv.quant import KVCodec


def convert_tokens(
    data: torch.Tensor, scales: torch.Tensor | None, source: KVCodec, target: KVCodec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-encode stored KV elements from ``source`` to ``target``.

    Identical codecs pass through untouched (bytes usable as is). Otherwise the values are
    decoded to float32 and re-encoded, so the only loss is the target codec's own rounding.
    """
    if source == target:
        return data, scales
    values = source.decode(data, scales, torch.float32)
    return target.encode(values)
