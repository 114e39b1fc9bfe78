"""Conversion between every pair of supported encodings, through bytes, within the verdict's bound."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_formats import ENCODINGS, fmt, kv_values, within_bound

from hetpd.kv.check import VerdictKind, check
from hetpd.kv.codec import Encoded
from hetpd.kv.convert import convert, convert_payload
from hetpd.kv.format import KVFormat
from hetpd.kv.layout import codec_of, pack, unpack
from hetpd.kv.plan import plan_handoff

TOKENS = 21  # not a multiple of any page size used: the last page is padded


def decoded(payload: bytes, f: KVFormat, tokens: int = TOKENS) -> torch.Tensor:
    codes, scales, zeros = unpack(payload, f, tokens)
    return codec_of(f).decode(codes, scales, torch.float32, zeros)


def bound_group(f: KVFormat) -> int | None:
    return f.quant.group_size


@pytest.mark.parametrize(("source", "target"), list(itertools.product(sorted(ENCODINGS), repeat=2)))
def test_every_pair_round_trips_within_the_stated_bound(source: str, target: str) -> None:
    producer = fmt(source)
    # The consumer also differs in page size, memory order, K/V grouping and scale placement.
    consumer = fmt(target, page_size=8, layout="HND", kv_split=False)
    if consumer.quant.scheme in ("per_token_head", "per_group"):
        consumer = consumer.with_(scale_location="inline")
    payload = pack(codec_of(producer).encode(kv_values(TOKENS, seed=7)), producer)
    sent = decoded(payload, producer)  # what the producer's bytes mean

    verdict = check(producer, consumer)
    converted, out_format = convert_payload(payload, producer, consumer, TOKENS)
    assert out_format == consumer and len(converted) == consumer.payload_bytes(TOKENS)
    received = decoded(converted, consumer)
    if verdict.kind in (VerdictKind.LOSSLESS_RELAYOUT, VerdictKind.LOSSLESS_WIDENING):
        assert torch.equal(received, sent)
    else:
        assert verdict.kind is VerdictKind.LOSSY
        assert within_bound(sent, received, verdict.error_bound, bound_group(consumer))
    # And back into the producer's own layout: a relayout round trip gives the very same bytes.
    if verdict.kind is VerdictKind.LOSSLESS_RELAYOUT:
        assert convert_payload(converted, consumer, producer, TOKENS)[0] == payload


@pytest.mark.parametrize("wire", ["int8-token-f16", "fp8-tensor-f32", "int4-g16z-f16"])
def test_a_forced_wire_format_stays_within_the_combined_bound(wire: str) -> None:
    producer, consumer = fmt("fp32"), fmt("bf16", page_size=4)
    plan = plan_handoff(producer, consumer, wire=fmt(wire))
    x = kv_values(TOKENS, seed=3)
    on_wire, wire_format = convert_payload(pack(codec_of(producer).encode(x), producer), producer, plan.wire, TOKENS)
    assert len(on_wire) == plan.wire_bytes(TOKENS) < producer.payload_bytes(TOKENS)
    received, _ = convert_payload(on_wire, wire_format, consumer, TOKENS)
    assert within_bound(x, decoded(received, consumer), plan.verdict.error_bound, fmt(wire).quant.group_size)


@settings(max_examples=40, deadline=None)
@given(
    encoding=st.sampled_from([e for e in sorted(ENCODINGS) if ENCODINGS[e][1].scheme != "per_tensor"]),
    producer_tp=st.sampled_from([1, 2, 4]),
    consumer_tp=st.sampled_from([1, 2, 4]),
    producer_page=st.sampled_from([1, 4, 16]),
    consumer_page=st.sampled_from([2, 8]),
    consumer_layout=st.sampled_from(["NHD", "HND"]),
    tokens=st.integers(1, 33),
)
def test_tensor_parallel_shards_split_and_merge_losslessly(
    encoding: str, producer_tp: int, consumer_tp: int, producer_page: int, consumer_page: int,
    consumer_layout: str, tokens: int,
) -> None:
    """Producer shards (TP=p) feed consumer shards (TP=c): each consumer shard gathers the heads it
    owns from every producer shard that overlaps it, and ends with exactly the bytes it would have
    encoded itself (token-wise scales do not depend on the split)."""
    heads = 4
    x = kv_values(tokens, seed=tokens)
    whole = codec_of(fmt(encoding)).encode(x)
    for c in range(consumer_tp):
        lo, hi = c * heads // consumer_tp, (c + 1) * heads // consumer_tp
        consumer = fmt(encoding, page_size=consumer_page, layout=consumer_layout, head_start=lo, head_end=hi)
        parts: dict[int, Encoded] = {}
        for p in range(producer_tp):
            plo, phi = p * heads // producer_tp, (p + 1) * heads // producer_tp
            producer = fmt(encoding, page_size=producer_page, head_start=plo, head_end=phi)
            if not check(producer, consumer).usable:
                assert phi <= lo or plo >= hi  # only shards that share no head are refused
                continue
            shard = Encoded(*(None if t is None else t[:, :, :, plo:phi] for t in whole))
            got, out = convert(unpack(pack(shard, producer), producer, tokens), producer, consumer)
            parts[out.head_start] = got
        merged = [parts[start] for start in sorted(parts)]
        assembled = Encoded(*(None if merged[0][i] is None else torch.cat([m[i] for m in merged], dim=3)
                              for i in range(3)))
        expected = Encoded(*(None if t is None else t[:, :, :, lo:hi] for t in whole))
        assert pack(assembled, consumer) == pack(expected, consumer)


def test_fp16_overflow_is_refused_not_corrupted() -> None:
    producer, consumer = fmt("fp32"), fmt("fp16")
    x = kv_values(4) * 1e4
    with pytest.raises(ValueError, match="float16 range"):
        convert(codec_of(producer).encode(x), producer, consumer)


def test_incompatible_conversion_raises_with_the_verdict() -> None:
    with pytest.raises(ValueError, match="rope_applied"):
        convert(codec_of(fmt("fp32")).encode(kv_values(2)), fmt("fp32"), fmt("fp32", rope_applied=False))
