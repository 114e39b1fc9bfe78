"""Hypothesis across processes (tcp, receiver in another process): few examples, one peer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transfer import harness
from transfer.test_inproc import span_lists

from hetpd.transfer import Span, make_sender

SIZE = 1 << 16


@pytest.fixture(scope="module")
def peer() -> Iterator[harness.Peer]:
    peer = harness.Peer("receiver", "tcp", SIZE)
    yield peer
    peer.close()


@pytest.mark.timeout(60)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spans=span_lists(), seed=st.integers(0, 1000))
def test_property_span_lists_land_exactly_across_processes(peer: harness.Peer, spans: list[Span], seed: int) -> None:
    source = harness.source_bytes(SIZE, seed)
    before = peer.dump()
    tid = f"p{seed}-{len(spans)}"
    peer.call("expect", tid=tid)
    with make_sender("tcp", piece_bytes=4096) as sender:
        sender.register_region("src", source)
        sender.post(tid, "src", peer.descriptor, spans, final=True)
        assert peer.call("wait", tid=tid, timeout=10)["status"] == "ok"
    expected = bytearray(before)
    for s in spans:
        expected[s.dst_offset : s.dst_offset + s.length] = source[s.src_offset : s.src_offset + s.length]
    assert peer.dump() == expected
