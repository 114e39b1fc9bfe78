"""The keyed data plane: strangers, wrong keys, impostors and forged tags against real sockets
(and, where the harness does, real processes). With a key, only the deployment's workers can
bind, feed or fail a transfer, and a sender only ever talks to the receiver it meant."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterator

import pytest
from transfer import harness, rogue

from hetpd.transfer import RegionDescriptor, Span, TransferReceiver, TransferStatus, make_receiver, make_sender
from hetpd.transfer.auth import TransferAuth
from hetpd.transfer.checksum import digest
from hetpd.transfer.shm import list_segments

KEY = b"the deployment's shared secret, for tests"
OTHER_KEY = b"another deployment's secret"
SIZE = 1 << 16
BACKENDS = ["tcp", "shm"]


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """This process's senders unlink their segments (others' processes may run beside us)."""
    yield
    assert list_segments(os.getpid()) == [], "leaked shared-memory segments"


def live_and_unbound(receiver: TransferReceiver, tid: str) -> bool:
    """Still live, not failed by anyone, and bound to no peer (internal: the ledger record)."""
    record = receiver._ledger.get(tid)  # type: ignore[attr-defined]
    return receiver.wait(tid, 0.01).status is TransferStatus.TIMED_OUT and record is not None and record.peer is None


def legit_transfer_completes(backend: str, receiver: TransferReceiver, dst: RegionDescriptor, region: bytearray,
                             tid: str, span: Span) -> None:
    """The keyed sender's transfer ends OK with exactly its bytes, and nothing else landed."""
    source = bytearray(os.urandom(SIZE))
    with make_sender(backend, key=KEY) as sender:
        sender.register_region("src", source)
        sender.post(tid, "src", dst, [span], final=True)
        assert sender.wait(tid, 5).status is TransferStatus.OK
    got = receiver.wait(tid, 5)
    assert got.ok and got.nbytes == span.length, got
    expected = bytearray(SIZE)
    expected[span.dst_offset : span.dst_offset + span.length] = source[span.src_offset : span.src_offset + span.length]
    assert region == expected


def test_transfer_keys_follow_the_documented_derivation() -> None:
    """transfer_key = HMAC-SHA256(key, "hetpd-kv-transfer\\0" + token + "\\0" + tid); every tag
    and the MAC key come from it, so they differ by receiver, transfer, and final or not."""
    auth = TransferAuth.derive(KEY, "r" * 32, "t1")
    transfer_key = hmac.new(KEY, b"hetpd-kv-transfer\0" + b"r" * 32 + b"\0t1", hashlib.sha256).digest()
    assert auth.post_tag == hmac.new(transfer_key, b"hetpd-kv-tag\0post", hashlib.sha256).digest()[:16]
    others = [TransferAuth.derive(KEY, "s" * 32, "t1"), TransferAuth.derive(KEY, "r" * 32, "t2"),
              TransferAuth.derive(OTHER_KEY, "r" * 32, "t1")]
    assert len({auth.post_tag, auth.final_tag, *(o.post_tag for o in others)}) == 5
    assert len({auth.piece_key, *(o.piece_key for o in others)}) == 4


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strangers_cannot_bind_inject_or_fail_a_keyed_transfer(backend: str) -> None:
    """Before the legitimate sender connects, strangers name the live transfer: raw bytes with
    no key, a keyless sender, a sender with another key, a raw handshake with another key.
    Each is refused (closed); the transfer stays live and unbound; then the keyed sender's
    transfer completes with exactly its bytes."""
    with make_receiver(backend, key=KEY) as receiver:
        region = bytearray(SIZE)
        dst = receiver.register_region("kv", region)
        receiver.expect("t", "kv", nbytes=4096)

        raw = rogue.raw_connect(dst)  # no key: reads the challenge, posts anyway
        rogue.read_challenge(raw)
        raw.sendall(rogue.forged_post(backend, "t", "kv"))
        assert rogue.closed_without_reply(raw, 2.0)
        raw.close()

        wrong = rogue.raw_connect(dst)  # answers the challenge with a MAC under another key
        challenge = rogue.read_challenge(wrong)
        nonce = os.urandom(32)
        mac = hmac.new(OTHER_KEY, b"hetpd-kv-hello\0" + challenge[4:68] + nonce, hashlib.sha256).digest()
        wrong.sendall(b"HPKH" + nonce + mac + rogue.forged_post(backend, "t", "kv"))
        assert rogue.closed_without_reply(wrong, 2.0)  # no WELCOME: the receiver checked the answer
        wrong.close()

        source = bytearray(b"\xbb" * SIZE)
        for key in (None, OTHER_KEY):  # real senders: without a key, with the wrong one
            with make_sender(backend, key=key, handshake_timeout=1.0) as stranger:
                stranger.register_region("src", source)
                stranger.post("t", "src", dst, [Span(0, 0, 4096)], final=True)
                failed = stranger.wait("t", 5)
                assert failed.status is TransferStatus.FAILED, failed

        assert live_and_unbound(receiver, "t")
        assert region == bytearray(SIZE)
        legit_transfer_completes(backend, receiver, dst, region, "t", Span(100, 0, 4096))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_holder_with_a_wrong_tag_is_dropped_and_binds_nothing(backend: str) -> None:
    """Past the handshake, a post whose tag is not the transfer's (here: the tag of another
    transfer id, and no tag) closes that connection; the transfer is not bound or failed."""
    with make_receiver(backend, key=KEY) as receiver:
        region = bytearray(SIZE)
        dst = receiver.register_region("kv", region)
        receiver.expect("t", "kv")
        token = str(dst.address["receiver"])
        for tag in (TransferAuth.derive(KEY, token, "another id").final_tag, b""):
            conn = rogue.key_holder(dst, KEY)
            conn.sock.sendall(rogue.forged_post(backend, "t", "kv", tag))
            assert rogue.closed_within(conn.sock, 2.0)
            conn.close()
        assert live_and_unbound(receiver, "t") and region == bytearray(SIZE)
        legit_transfer_completes(backend, receiver, dst, region, "t", Span(0, 500, 3000))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sender_with_another_key_fails_promptly_and_nothing_lands(backend: str) -> None:
    peer = harness.Peer("receiver", backend, SIZE, key=KEY)
    try:
        peer.call("expect", tid="w")
        with make_sender(backend, key=OTHER_KEY) as sender:
            sender.register_region("src", bytearray(b"\xcc" * SIZE))
            start = time.monotonic()
            sender.post("w", "src", peer.descriptor, [Span(0, 0, SIZE)], final=True)
            got = sender.wait("w", 5)
            assert time.monotonic() - start < 2.0
            assert got.status is TransferStatus.FAILED and "authentication failed" in (got.error or ""), got
        assert peer.call("wait", tid="w", timeout=0.05)["status"] == "timed_out"  # still live, not failed
        assert peer.dump() == bytes(SIZE)
    finally:
        peer.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sender_never_sends_kv_to_an_impostor_on_the_port(backend: str) -> None:
    """An impostor with the receiver's token (public: it is in the descriptor) but not the key
    gets the sender's handshake answer and nothing more; the transfer fails as an
    authentication failure."""
    with make_receiver(backend, key=KEY) as receiver:
        real = receiver.register_region("kv", bytearray(SIZE))
    impostor = rogue.Impostor(str(real.address["receiver"]))
    fake = RegionDescriptor(backend, "kv", SIZE, {**real.address, "port": impostor.port})
    with make_sender(backend, key=KEY) as sender:
        sender.register_region("src", bytearray(b"\xdd" * SIZE))
        sender.post("i", "src", fake, [Span(0, 0, SIZE)], final=True)
        got = sender.wait("i", 5)
    impostor.join()
    assert impostor.answered and impostor.after_hello == b""
    assert got.status is TransferStatus.FAILED and "authentication failed" in (got.error or "")
    assert "could not prove it knows the key" in (got.error or "")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keyed_and_keyless_ends_do_not_talk(backend: str) -> None:
    """A keyed sender refuses a keyless receiver (no challenge within its handshake timeout);
    a keyless sender is cut off by a keyed receiver. Both fail promptly; nothing lands."""
    with make_receiver(backend) as keyless, make_receiver(backend, key=KEY) as keyed:
        regions = {"keyless": bytearray(SIZE), "keyed": bytearray(SIZE)}
        dsts = {"keyless": keyless.register_region("kv", regions["keyless"]),
                "keyed": keyed.register_region("kv", regions["keyed"])}
        keyless.expect("m", "kv")
        keyed.expect("m", "kv")
        for name, key in (("keyless", KEY), ("keyed", None)):
            with make_sender(backend, key=key, handshake_timeout=0.5) as sender:
                sender.register_region("src", bytearray(b"\xee" * SIZE))
                start = time.monotonic()
                sender.post("m", "src", dsts[name], [Span(0, 0, SIZE)], final=True)
                got = sender.wait("m", 5)
                assert got.status is TransferStatus.FAILED and time.monotonic() - start < 2.0, got
                if key is not None:
                    assert "authentication failed" in (got.error or "")
        assert keyed.wait("m", 0.01).status is TransferStatus.TIMED_OUT
        assert regions["keyed"] == bytearray(SIZE)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keyed_round_trip_across_processes(backend: str) -> None:
    harness.round_trip_many_spans(backend, key=KEY)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_bytes_fail_with_checksum_under_a_key(backend: str) -> None:
    """FaultInjection flips a byte after the MAC was taken: FAILED, and the error says
    "checksum" (what the handoff layer maps to a checksum failure)."""
    harness.checksum_mismatch_fails(backend, key=KEY)


@pytest.mark.timeout(30)
def test_the_piece_mac_binds_key_offset_and_length() -> None:
    """A key holder's piece whose MAC is right for another offset, or whose integrity value is
    a plain xxh3 checksum, fails the transfer as a checksum mismatch: the MAC is keyed and
    covers where the bytes land."""
    payload = os.urandom(4096)
    with make_receiver("tcp", key=KEY) as receiver:
        region = bytearray(SIZE)
        dst = receiver.register_region("kv", region)
        auth = TransferAuth.derive(KEY, str(dst.address["receiver"]), "o")
        for tid, checksum in (("o", digest(Span(0, 0, 4096), memoryview(payload), auth.piece_key)),
                              ("x", digest(Span(0, 100, 4096), memoryview(payload), None))):
            receiver.expect(tid, "kv")
            tag = TransferAuth.derive(KEY, str(dst.address["receiver"]), tid).post_tag
            conn = rogue.key_holder(dst, KEY)
            conn.sock.sendall(rogue.tcp_data(tid, "kv", 100, payload, checksum, tag))
            got = receiver.wait(tid, 5)
            conn.close()
            assert got.status is TransferStatus.FAILED and "checksum mismatch" in (got.error or ""), got


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keyed_without_verification_still_moves_the_bytes(backend: str) -> None:
    """verify=False (benchmarks) with a key: handshake and tags, no MACs; the bytes land."""
    with make_receiver(backend, key=KEY, verify=False) as receiver, \
            make_sender(backend, key=KEY, verify=False, piece_bytes=1000) as sender:
        region, source = bytearray(10_000), bytearray(os.urandom(10_000))
        dst = receiver.register_region("kv", region)
        sender.register_region("src", source)
        receiver.expect("n", "kv", nbytes=10_000)
        sender.post("n", "src", dst, [Span(0, 5000, 5000), Span(7000, 0, 3000), Span(5000, 3000, 2000)], final=True)
        assert receiver.wait("n", 5).ok
        assert region[5000:] == source[:5000] and region[:3000] == source[7000:]
        assert region[3000:5000] == source[5000:7000]
