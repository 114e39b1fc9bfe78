"""Shared-memory transport: segment hygiene, staging."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from transfer import harness

from hetpd.transfer import FaultInjection, Span, TransferStatus
from hetpd.transfer.shm import ShmReceiver, ShmSender, list_segments, remove_orphan_segments

@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = set(list_segments())
    yield
    remove_orphan_segments()  # a peer killed on purpose cannot unlink its own
    leaked = set(list_segments()) - before
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"


@pytest.mark.timeout(30)
def test_bad_input_raises_and_changes_nothing() -> None:
    with ShmReceiver() as receiver, ShmSender() as sender:
        harness.out_of_bounds_raises(sender, receiver)


@pytest.mark.timeout(30)
def test_segments_exist_while_open_and_are_unlinked_on_close() -> None:
    sender = ShmSender()
    view = sender.allocate_region("a", 1 << 16)  # the caller may still hold this view at close
    sender.register_region("b", bytearray(10))
    assert len(list_segments(os.getpid())) == 2
    sender.close()
    assert list_segments(os.getpid()) == []
    del view


@pytest.mark.timeout(30)
def test_allocated_region_is_sent_without_staging_and_source_change_after_post_is_caught() -> None:
    with ShmReceiver() as receiver, ShmSender() as sender:
        region = bytearray(1 << 20)
        dst = receiver.register_region("kv", region)
        src = sender.allocate_region("src", 1 << 20)
        src[:] = os.urandom(1 << 20)
        receiver.expect("a", "kv")
        sender.post("a", "src", dst, [Span(0, 0, 1 << 20)], final=True)
        assert receiver.wait("a", 5).ok and region == src
        # Pull backends flip the exposed source after hashing: the receiver must notice.
    with ShmReceiver() as receiver, ShmSender(fault=FaultInjection("b", 5)) as sender:
        dst = receiver.register_region("kv", bytearray(100))
        sender.allocate_region("src", 100)
        receiver.expect("b", "kv")
        sender.post("b", "src", dst, [Span(0, 0, 100)], final=True)
        assert receiver.wait("b", 5).status is TransferStatus.FAILED


@pytest.mark.timeout(30)
def test_remove_orphan_segments_spares_live_processes() -> None:
    with ShmSender() as sender:
        sender.allocate_region("a", 4096)
        assert remove_orphan_segments() == [] or all(str(os.getpid()) not in n for n in remove_orphan_segments())
        assert len(list_segments(os.getpid())) == 1


@pytest.mark.timeout(30)
def test_unregistering_a_source_unlinks_it_and_the_receiver_unmaps_it() -> None:
    import time

    with ShmReceiver() as receiver, ShmSender() as sender:
        dst = receiver.register_region("kv", bytearray(100))
        sender.allocate_region("src", 100)
        receiver.expect("a", "kv")
        sender.post("a", "src", dst, [Span(0, 0, 100)], final=False)
        with pytest.raises(ValueError, match="live transfers \\['a'\\]"):
            sender.unregister_region("src")
        sender.post("a", "src", dst, [], final=True)
        assert sender.wait("a", 5).ok
        assert len(receiver._mapped) == 1
        sender.unregister_region("src")
        assert list_segments(os.getpid()) == []
        deadline = time.monotonic() + 5
        while receiver._mapped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not receiver._mapped, "receiver kept mapping a segment the sender freed"
