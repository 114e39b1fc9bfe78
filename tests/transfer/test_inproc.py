"""In-process transport: the same guarantees, checked in one process (and by hypothesis)."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transfer import harness

from hetpd.transfer import FaultInjection, Span, TransferStatus
from hetpd.transfer.inproc import InprocReceiver, InprocSender

SIZE = 1 << 16


def pair(**sender_options: object) -> tuple[InprocReceiver, InprocSender, bytearray, bytearray]:
    receiver = InprocReceiver()
    sender = InprocSender(receiver, **sender_options)  # type: ignore[arg-type]
    region, source = bytearray(SIZE), harness.source_bytes(SIZE, 7)
    return receiver, sender, region, source


def test_round_trip_many_spans_in_several_posts() -> None:
    receiver, sender, region, source = pair(piece_bytes=1000)  # small pieces: many per span
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    spans = harness.scattered_spans(random.Random(1), SIZE, 50, 3000)
    receiver.expect("t", "kv")
    sender.post("t", "src", dst, spans[:20], final=False)
    assert receiver.poll() == [] and receiver.wait("t", 0.01).status is TransferStatus.TIMED_OUT
    sender.post("t", "src", dst, spans[20:], final=True)
    got = receiver.wait("t", 1)
    assert got.ok and got.nbytes == sum(s.length for s in spans) and got.error is None
    assert region == harness.expected_region(SIZE, spans, source)
    assert sender.wait("t", 1).ok


def test_result_is_delivered_once_then_the_id_is_forgotten() -> None:
    receiver, sender, region, source = pair()
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("t", "kv")
    sender.post("t", "src", dst, [Span(0, 0, 10)], final=True)
    assert [r.transfer_id for r in receiver.poll()] == ["t"]
    with pytest.raises(ValueError, match="unknown transfer_id 't'"):
        receiver.wait("t", 0.01)
    assert [r.status for r in sender.poll()] == [TransferStatus.OK]


def test_checksum_mismatch_fails_and_bytes_never_reported_ok() -> None:
    receiver, sender, region, source = pair(fault=FaultInjection("bad", 5000), piece_bytes=4096)
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("bad", "kv")
    sender.post("bad", "src", dst, [Span(0, 100, 4096), Span(4096, 8192, 4096)], final=True)
    got = receiver.wait("bad", 1)
    assert got.status is TransferStatus.FAILED and got.nbytes == 4096  # only the first piece verified
    assert "'bad'" in (got.error or "") and "src_offset=4096 dst_offset=8192 length=4096" in (got.error or "")
    assert source[5000] == harness.source_bytes(SIZE, 7)[5000]  # push backends never touch the source


def test_cancel_then_late_posts_change_nothing() -> None:
    receiver, sender, region, source = pair()
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("c", "kv")
    sender.post("c", "src", dst, [Span(0, 0, 100)], final=False)
    assert receiver.cancel("c").status is TransferStatus.CANCELLED
    assert sender.wait("c", 1).status is TransferStatus.CANCELLED
    unaware = InprocSender(receiver)
    unaware.register_region("src", source)
    unaware.post("c", "src", dst, [Span(100, 100, 1000)], final=True)
    assert unaware.wait("c", 1).status is TransferStatus.CANCELLED
    assert region[100:] == bytes(SIZE - 100)


def test_cancel_waits_for_a_piece_being_copied_and_nothing_lands_after() -> None:
    """Cancel from another thread while the sender copies: after cancel returns, the region
    stops changing."""
    size = 64 << 20
    receiver, region, source = InprocReceiver(), bytearray(size), bytearray(b"\x01") * size
    sender = InprocSender(receiver, piece_bytes=256 << 10)
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("c", "kv")
    poster = threading.Thread(target=sender.post, args=("c", "src", dst, [Span(0, 0, size)]), kwargs={"final": True})
    poster.start()
    while True:
        got = receiver.wait("c", 0.001)
        if got.status is not TransferStatus.TIMED_OUT:
            break  # the copy won the race and finished first: its result is delivered, nothing to cancel
        if got.nbytes > 0:
            got = receiver.cancel("c")
            break
    snapshot = bytes(region)
    poster.join()
    assert bytes(region) == snapshot
    if got.status is TransferStatus.CANCELLED:
        assert snapshot.count(1) == got.nbytes < size


def test_sender_cancel_tells_the_receiver() -> None:
    receiver, sender, region, source = pair()
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("s", "kv")
    sender.post("s", "src", dst, [Span(0, 0, 100)], final=False)
    assert sender.cancel("s").status is TransferStatus.CANCELLED
    got = receiver.wait("s", 1)
    assert got.status is TransferStatus.CANCELLED and "by the sender" in (got.error or "")


def test_unexpected_transfer_is_refused_and_never_written() -> None:
    receiver, sender, region, source = pair()
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    sender.post("x", "src", dst, [Span(0, 0, 100)], final=True)
    got = sender.wait("x", 1)
    assert got.status is TransferStatus.FAILED and "expect()" in (got.error or "")
    assert region == bytearray(SIZE)


def test_region_rules() -> None:
    receiver, sender, region, source = pair()
    receiver.register_region("kv", region)
    with pytest.raises(ValueError, match="already registered"):
        receiver.register_region("kv", bytearray(1))
    with pytest.raises(ValueError, match="must be writable"):
        receiver.register_region("ro", b"abc")
    receiver.expect("t", "kv")
    with pytest.raises(ValueError, match="live transfers"):
        receiver.unregister_region("kv")
    with pytest.raises(ValueError, match="already live"):
        receiver.expect("t", "kv")
    receiver.cancel("t")
    receiver.unregister_region("kv")
    with pytest.raises(ValueError, match="unknown region"):
        receiver.unregister_region("kv")


def test_bad_input_raises_and_changes_nothing() -> None:
    receiver = InprocReceiver()
    harness.out_of_bounds_raises(InprocSender(receiver), receiver)


def test_final_post_twice_raises() -> None:
    receiver, sender, region, source = pair()
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("f", "kv")
    sender.post("f", "src", dst, [Span(0, 0, 1)], final=True)
    with pytest.raises(ValueError, match="already had its final post"):
        sender.post("f", "src", dst, [Span(0, 0, 1)], final=True)


@st.composite
def span_lists(draw: st.DrawFn) -> list[Span]:
    """Random non-overlapping destination spans (sources may overlap), random order."""
    cuts = sorted(set(draw(st.lists(st.integers(0, SIZE), min_size=2, max_size=40))))
    spans = []
    for start, end in zip(cuts, cuts[1:]):
        if end > start and draw(st.booleans()):
            length = draw(st.integers(1, end - start))
            spans.append(Span(draw(st.integers(0, SIZE - length)), start, length))
    return draw(st.permutations(spans))


@settings(max_examples=60, deadline=None)
@given(spans=span_lists(), split=st.integers(0, 40), piece=st.sampled_from([7, 512, 1 << 20]))
def test_property_any_span_list_lands_exactly(spans: list[Span], split: int, piece: int) -> None:
    receiver, sender, region, source = pair(piece_bytes=piece)
    dst = receiver.register_region("kv", region)
    sender.register_region("src", source)
    receiver.expect("p", "kv")
    sender.post("p", "src", dst, spans[:split], final=False)
    sender.post("p", "src", dst, spans[split:], final=True)
    got = receiver.wait("p", 1)
    assert got.ok and got.nbytes == sum(s.length for s in spans)
    assert region == harness.expected_region(SIZE, spans, source)
