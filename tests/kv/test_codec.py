"""KV codecs: round-trip error within each codec's stated bound; conversion between codecs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetpd.kv.convert import convert_tokens
from hetpd.kv.quant import KV_DTYPES, canonical_kv_dtype, codec_for


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(KV_DTYPES),
    tokens=st.integers(1, 20),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 64, 128]),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_within_the_stated_bound(
    name: str, tokens: int, heads: int, head_dim: int, magnitude: float, seed: int
) -> None:
    codec = codec_for(name)
    x = torch.randn(tokens, heads, head_dim, generator=torch.Generator().manual_seed(seed)) * magnitude
    data, scale = codec.encode(x)
    assert data.dtype == codec.storage_dtype and (scale is not None) == codec.quantized
    back = codec.decode(data, scale, torch.float32)
    absmax = x.abs().amax(dim=-1, keepdim=True)
    assert torch.all((back - x).abs() <= codec.scale_bound * absmax * 1.0001 + 1e-30)


def test_zero_vectors_survive_quantisation() -> None:
    for name in ("int8", "fp8_e4m3"):
        codec = codec_for(name)
        data, scale = codec.encode(torch.zeros(2, 3, 8))
        assert torch.equal(codec.decode(data, scale, torch.float32), torch.zeros(2, 3, 8))


@pytest.mark.parametrize("source", KV_DTYPES)
@pytest.mark.parametrize("target", KV_DTYPES)
def test_conversion_matches_encoding_the_source_values_directly(source: str, target: str) -> None:
    x = torch.randn(5, 2, 16)
    src, dst = codec_for(source), codec_for(target)
    data, scale = src.encode(x)
    converted, converted_scale = convert_tokens(data, scale, src, dst)
    expected, expected_scale = dst.encode(src.decode(data, scale, torch.float32))
    assert torch.equal(converted, expected)
    if dst.quantized:
        assert converted_scale is not None and expected_scale is not None
        assert torch.equal(converted_scale, expected_scale)


def test_aliases_and_unknown_names() -> None:
    assert canonical_kv_dtype("fp8") == "fp8_e4m3" and canonical_kv_dtype("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' is not supported"):
        canonical_kv_dtype("int4")
