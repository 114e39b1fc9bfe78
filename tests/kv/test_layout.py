"""Payload byte layout: pack and unpack are exact inverses for every layout, page size and head range."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_formats import ENCODINGS, fmt, kv_values

from hetpd.kv.format import IncompatibleKVError
from hetpd.kv.layout import codec_of, pack, unpack


@settings(max_examples=80, deadline=None)
@given(
    encoding=st.sampled_from(sorted(ENCODINGS)),
    tokens=st.integers(1, 40),
    page_size=st.sampled_from([1, 3, 8, 16]),
    layout=st.sampled_from(["NHD", "HND"]),
    kv_split=st.booleans(),
    inline=st.booleans(),
    heads=st.sampled_from([(0, 4), (1, 3), (2, 3)]),
)
def test_pack_unpack_round_trip(encoding: str, tokens: int, page_size: int, layout: str, kv_split: bool,
                                inline: bool, heads: tuple[int, int]) -> None:
    quantised = ENCODINGS[encoding][1].scheme not in ("none", "per_tensor")
    f = fmt(encoding, page_size=page_size, layout=layout, kv_split=kv_split, head_start=heads[0], head_end=heads[1],
            scale_location="inline" if inline and quantised else "separate")
    assert not f.problems()
    encoded = codec_of(f).encode(kv_values(tokens, heads=heads[1] - heads[0]))
    payload = pack(encoded, f)
    assert len(payload) == f.payload_bytes(tokens)
    back = unpack(payload, f, tokens)
    for original, restored in zip(encoded, back):
        assert (original is None) == (restored is None)
        if original is not None:
            assert torch.equal(original, restored)
    # A layer range is a contiguous byte range: layer 1 alone unpacks to layer 1.
    one = unpack(payload[f.layer_bytes(tokens):], f, tokens)
    assert torch.equal(one.codes, encoded.codes[1:])


def test_nhd_and_hnd_put_the_same_element_where_the_docs_say() -> None:
    x = kv_values(5)
    for layout in ("NHD", "HND"):
        f = fmt("fp32", page_size=4, layout=layout)
        values = torch.frombuffer(bytearray(pack(codec_of(f).encode(x), f)), dtype=torch.float32)
        first_k_page = values[: 4 * 4 * 32].view(4, 4, 32)  # layer 0, K, page 0
        token2_head1 = first_k_page[2, 1] if layout == "NHD" else first_k_page[1, 2]
        assert torch.equal(token2_head1, x[0, 0, 2, 1])


def test_a_payload_of_the_wrong_size_is_refused() -> None:
    f = fmt("bf16")
    payload = pack(codec_of(f).encode(kv_values(7)), f)
    with pytest.raises(IncompatibleKVError, match="not a whole number"):
        unpack(payload[:-2], f, 7)
