"""What a peer can make a listener spend, keyed or not: small first reads, a handshake timeout,
connection caps, a thread only while a connection lives. And a final post counts only after
the bytes ``expect(..., nbytes)`` asked for. Real sockets, no mocks."""

from __future__ import annotations

import os
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest
from transfer import rogue

from hetpd.transfer import Span, TransferReceiver, TransferStatus, make_receiver, make_sender
from hetpd.transfer.net import Listener

KEY = b"the deployment's shared secret, for tests"
TIMEOUT = 0.5  # a short handshake timeout, so the tests see it pass


def listener(receiver: TransferReceiver) -> Listener:
    found: Listener = receiver._listener  # type: ignore[attr-defined]
    return found


def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend, keyed, announce, closed_at_once", [
    ("shm", False, 0xFFFF_FFF0, True),  # over the first-frame cap: refused on the header alone
    ("shm", False, (1 << 20) - 1, False),  # under it: waits for the body, allocating as it comes
    ("shm", True, 0xFFFF_FFF0, False),  # keyed: the handshake reads one 68-byte frame, no more
    ("tcp", False, 0xFFFF_FFF0, False),  # keyless tcp: a fixed-size frame header
    ("tcp", True, 0xFFFF_FFF0, False),
])
def test_a_length_prefix_announcing_much_allocates_little_and_times_out(
        backend: str, keyed: bool, announce: int, closed_at_once: bool) -> None:
    """A stranger sends a 4-byte length prefix and nothing else. The receiver process never
    allocates what it announced (tracemalloc sees every thread here), and closes the connection
    at once or when the handshake timeout passes."""
    key = KEY if keyed else None
    with make_receiver(backend, key=key, handshake_timeout=TIMEOUT) as receiver:
        dst = receiver.register_region("kv", bytearray(4096))
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            sock = rogue.raw_connect(dst)
            start = time.monotonic()
            sock.sendall(struct.pack("!I", announce))
            closed = rogue.closed_within(sock, 3.0)
            elapsed = time.monotonic() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        sock.close()
        assert closed
        assert peak - before < 256 << 10, f"{(peak - before) >> 10} KiB allocated on a 4-byte header"
        if closed_at_once:
            assert elapsed < TIMEOUT / 2
        else:
            assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 1.0
        assert eventually(lambda: listener(receiver).live() == 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend, keyed", [("tcp", False), ("shm", True)])
def test_idle_connections_are_closed_after_the_timeout_and_their_threads_end(backend: str, keyed: bool) -> None:
    """50 connections that never say anything (from 7 loopback addresses, under the per-peer
    cap): all closed after the handshake timeout; the thread count returns to where it was."""
    key = KEY if keyed else None
    with make_receiver(backend, key=key, handshake_timeout=TIMEOUT) as receiver:
        dst = receiver.register_region("kv", bytearray(4096))
        baseline = threading.active_count()
        socks = [rogue.raw_connect(dst, f"127.0.0.{10 + i % 7}") for i in range(50)]
        assert eventually(lambda: listener(receiver).live() == 50)
        assert threading.active_count() == baseline + 50  # one thread per connection, no more
        start = time.monotonic()
        assert all(rogue.closed_within(sock, TIMEOUT + 2.0) for sock in socks)
        assert time.monotonic() - start < TIMEOUT + 2.0
        for sock in socks:
            sock.close()
        assert eventually(lambda: threading.active_count() == baseline), threading.enumerate()
        assert listener(receiver).live() == 0 and listener(receiver).refused == 0


@pytest.mark.timeout(30)
def test_the_ninth_connection_from_one_address_is_closed_at_once() -> None:
    with make_receiver("tcp", handshake_timeout=5.0) as receiver:
        dst = receiver.register_region("kv", bytearray(4096))
        baseline = threading.active_count()
        eight = [rogue.raw_connect(dst) for _ in range(8)]
        assert eventually(lambda: listener(receiver).live() == 8)
        ninth = rogue.raw_connect(dst)
        assert rogue.closed_within(ninth, 1.0)
        assert listener(receiver).refused == 1 and threading.active_count() == baseline + 8  # no thread for it
        assert not any(rogue.closed_within(sock, 0.01) for sock in eight)
        elsewhere = rogue.raw_connect(dst, "127.0.0.2")  # another peer address is not capped by these
        assert not rogue.closed_within(elsewhere, 0.2)
        eight.pop().close()  # a slot frees when a connection ends
        assert eventually(lambda: listener(receiver).live() == 8)
        again = rogue.raw_connect(dst)
        assert not rogue.closed_within(again, 0.2) and listener(receiver).refused == 1
        for sock in [*eight, elsewhere, again]:
            sock.close()
        assert eventually(lambda: threading.active_count() == baseline)


@pytest.mark.parametrize("backend", ["tcp", "shm"])
@pytest.mark.timeout(60)
def test_trusted_senders_on_one_host_are_not_held_to_the_strangers_cap(backend: str) -> None:
    """Twelve prefill workers on one host send to one decode worker: each sender keeps its
    connection, all from 127.0.0.1, past the cap of 8 that only binds connections still proving
    themselves. A stranger from that address still gets the strangers' 8 slots, no more."""
    with make_receiver(backend, key=KEY, handshake_timeout=TIMEOUT) as receiver:
        senders = [make_sender(backend, key=KEY) for _ in range(12)]
        try:
            regions = [bytearray(4096) for _ in senders]
            for i, (sender, region) in enumerate(zip(senders, regions)):
                dst = receiver.register_region(f"kv{i}", region)
                receiver.expect(f"t{i}", f"kv{i}", nbytes=4096)
                sender.register_region(f"src{i}", bytearray(bytes([i + 1]) * 4096))
                sender.post(f"t{i}", f"src{i}", dst, [Span(0, 0, 4096)], final=True)
                assert receiver.wait(f"t{i}", 10.0).status is TransferStatus.OK
                assert sender.wait(f"t{i}", 10.0).status is TransferStatus.OK
            assert all(region == bytes([i + 1]) * 4096 for i, region in enumerate(regions))
            assert listener(receiver).live() == 12 and listener(receiver).refused == 0  # all kept, none refused
            strangers = [rogue.raw_connect(dst) for _ in range(9)]
            assert eventually(lambda: listener(receiver).refused == 1)  # the ninth stranger
            for sock in strangers:
                sock.close()
        finally:
            for sender in senders:
                sender.close()


@pytest.mark.timeout(30)
def test_the_total_cap_holds_across_addresses() -> None:
    with make_receiver("shm", key=KEY, max_conns=4) as receiver:
        dst = receiver.register_region("kv", bytearray(4096))
        four = [rogue.raw_connect(dst, f"127.0.0.{20 + i}") for i in range(4)]
        assert eventually(lambda: listener(receiver).live() == 4)
        fifth = rogue.raw_connect(dst, "127.0.0.30")
        assert rogue.closed_within(fifth, 1.0) and listener(receiver).refused == 1
        for sock in [*four, fifth]:
            sock.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "keyed"])
@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_a_connection_that_proved_itself_may_idle_past_the_timeout(backend: str, keyed: bool) -> None:
    """The timeout is for strangers: a sender's connection, once authenticated (or past its
    first valid frame), stays open between transfers."""
    key = KEY if keyed else None
    with make_receiver(backend, key=key, handshake_timeout=0.2) as receiver, \
            make_sender(backend, key=key) as sender:
        region, source = bytearray(4096), bytearray(os.urandom(4096))
        dst = receiver.register_region("kv", region)
        sender.register_region("src", source)
        for tid in ("a", "b"):
            if tid == "b":
                time.sleep(0.5)  # idle for over twice the handshake timeout
            receiver.expect(tid, "kv")
            sender.post(tid, "src", dst, [Span(0, 0, 4096)], final=True)
            assert sender.wait(tid, 5).ok and receiver.wait(tid, 5).ok
        assert listener(receiver).accepted == 1 and listener(receiver).live() == 1  # one connection all along
        assert region == source


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend, keyed", [("inproc", False), ("tcp", False), ("shm", False), ("tcp", True),
                                            ("shm", True)])
def test_a_final_post_counts_only_after_the_expected_bytes(backend: str, keyed: bool) -> None:
    key = KEY if keyed else None
    receiver = make_receiver(backend, key=key)
    options = {"receiver": receiver} if backend == "inproc" else {"key": key}
    with receiver, make_sender(backend, **options) as sender:
        region, source = bytearray(4096), bytearray(os.urandom(4096))
        dst = receiver.register_region("kv", region)
        sender.register_region("src", source)
        with pytest.raises(ValueError, match=r"nbytes must be None or an int in \[0, 4096\]"):
            receiver.expect("x", "kv", nbytes=4097)
        with pytest.raises(ValueError, match="nbytes"):
            receiver.expect("x", "kv", nbytes=-1)
        cases = {"empty": [], "short": [Span(0, 0, 1000)], "full": [Span(0, 0, 4000), Span(4000, 4000, 96)]}
        for tid, spans in cases.items():
            receiver.expect(tid, "kv", nbytes=4096)
            sender.post(tid, "src", dst, spans, final=True)
            got = receiver.wait(tid, 5)
            landed = sum(s.length for s in spans)
            if tid == "full":
                assert got.ok and got.nbytes == 4096 and region == source
            else:
                assert got.status is TransferStatus.FAILED, got
                assert f"final post after {landed} of 4096 expected bytes" in (got.error or "")
                assert sender.wait(tid, 5).status is TransferStatus.FAILED
        receiver.expect("unchecked", "kv")  # nbytes not given: any final post completes it, as before
        sender.post("unchecked", "src", dst, [], final=True)
        assert receiver.wait("unchecked", 5).ok
