"""KV codecs: every encoding's round-trip error stays within its stated bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_formats import ENCODINGS, kv_values, within_bound

from hetpd.kv.codec import KVCodec, canonical_kv_dtype, codec_for


@settings(max_examples=200, deadline=None)
@given(
    encoding=st.sampled_from(sorted(ENCODINGS)),
    tokens=st.integers(1, 20),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([32, 64]),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_within_the_stated_bound(
    encoding: str, tokens: int, heads: int, head_dim: int, magnitude: float, seed: int
) -> None:
    dtype, quant = ENCODINGS[encoding]
    codec = KVCodec(dtype, quant)
    x = kv_values(tokens, heads, head_dim, seed=seed, magnitude=magnitude)
    codes, scales, zeros = codec.encode(x)
    assert codes.dtype == codec.storage_dtype and codes.shape[-1] == codec.storage_dim(head_dim)
    assert (scales is not None) == codec.quantized and (zeros is not None) == quant.zero_point
    back = codec.decode(codes, scales, torch.float32, zeros)
    assert within_bound(x, back, codec.error_bound, quant.group_size)


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if ENCODINGS[e][1].scheme != "none"])
def test_constant_and_zero_vectors_survive_quantisation(encoding: str) -> None:
    codec = KVCodec(*ENCODINGS[encoding])
    for x in (torch.zeros(1, 2, 3, 2, 32), torch.full((1, 2, 3, 2, 32), -2.5)):
        back = codec.decode(*codec.encode(x)[:2], torch.float32, codec.encode(x).zeros)
        assert within_bound(x, back, codec.error_bound, codec.quant.group_size)


def test_the_bound_is_tight_enough_to_mean_something() -> None:
    """The stated bound is within 2.5x of the worst error seen, so a broken codec would trip it."""
    x = kv_values(64, seed=1)
    for encoding, (dtype, quant) in ENCODINGS.items():
        codec = KVCodec(dtype, quant)
        if codec.error_bound.exact:
            continue
        back = codec.decode(codec.encode(x).codes, codec.encode(x).scales, torch.float32, codec.encode(x).zeros)
        loose = codec.error_bound.relative / 2.5
        assert not within_bound(x, back, type(codec.error_bound)(loose, codec.error_bound.unit), quant.group_size), encoding


def test_engine_codecs_and_aliases() -> None:
    assert canonical_kv_dtype("fp8") == "fp8_e4m3" and canonical_kv_dtype("bf16") == "bfloat16"
    assert codec_for("int8").quant.scheme == "per_token_head" and codec_for("int8").quant.scale_dtype == "float32"
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' is not supported"):
        canonical_kv_dtype("int4")
