"""Drive a peer process (``peer.py``) and run the cross-process scenarios every network backend
must pass: the same checks for shm, tcp and nixl, real processes and sockets, no mocks."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hetpd.transfer import (
    FaultInjection,
    RegionDescriptor,
    Span,
    TransferReceiver,
    TransferSender,
    TransferStatus,
    make_receiver,
    make_sender,
)

PEER = Path(__file__).with_name("peer.py")
REPLY_TIMEOUT_S = 20.0


def source_bytes(size: int, seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def scattered_spans(rng: random.Random, size: int, count: int, max_len: int) -> list[Span]:
    """``count`` non-overlapping spans at scattered offsets on both sides (dst order shuffled)."""
    slot = size // count
    dst_slots = list(range(count))
    rng.shuffle(dst_slots)
    spans = []
    for i, d in enumerate(dst_slots):
        length = rng.randint(1, min(max_len, slot))
        spans.append(Span(i * slot + rng.randint(0, slot - length), d * slot + rng.randint(0, slot - length), length))
    return spans


def spans_json(spans: list[Span]) -> list[list[int]]:
    return [[s.src_offset, s.dst_offset, s.length] for s in spans]


class Peer:
    """A ``peer.py`` process; ``call`` sends one command and returns its reply (bounded wait)."""

    def __init__(self, role: str, backend: str, size: int, seed: int = 0, fault: FaultInjection | None = None,
                 key: bytes | None = None) -> None:
        args = [sys.executable, str(PEER), role, backend, str(size), str(seed)]
        if fault is not None:
            args.append(json.dumps({"transfer_id": fault.transfer_id, "src_offset": fault.src_offset}))
        env = {**os.environ, "HETPD_TEST_KEY": key.hex() if key is not None else ""}
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, env=env)
        ready = self._read()
        self.descriptor = RegionDescriptor.from_dict(ready["descriptor"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stderr.seek(0)
            raise AssertionError(f"peer gave no reply; stderr:\n{self.stderr.read().decode()[-3000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def dump(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "region")
            assert self.call("dump", path=path) == {"ok": True}
            return Path(path).read_bytes()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (AssertionError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def expected_region(size: int, spans: list[Span], source: bytes) -> bytearray:
    region = bytearray(size)
    for s in spans:
        region[s.dst_offset : s.dst_offset + s.length] = source[s.src_offset : s.src_offset + s.length]
    return region


# ---------------------------------------------------------------------- scenarios
SIZE = 3 << 20


def round_trip_many_spans(backend: str, seed: int = 1, key: bytes | None = None) -> None:
    """Sender here, receiver in another process; 64 scattered spans in three posts."""
    rng = random.Random(seed)
    spans = scattered_spans(rng, SIZE, 64, 200_000)
    source = source_bytes(SIZE, seed)
    peer = Peer("receiver", backend, SIZE, key=key)
    try:
        with make_sender(backend, key=key) as sender:
            sender.register_region("src", source)
            assert peer.call("expect", tid="t") == {"ok": True}
            sender.post("t", "src", peer.descriptor, spans[:10], final=False)
            # Not final yet: the receiver must not report the transfer done.
            assert peer.call("wait", tid="t", timeout=0.2)["status"] == "timed_out"
            sender.post("t", "src", peer.descriptor, spans[10:40], final=False)
            sender.post("t", "src", peer.descriptor, spans[40:], final=True)
            got = peer.call("wait", tid="t", timeout=10)
            assert got["status"] == "ok", got
            assert got["nbytes"] == sum(s.length for s in spans)
            assert sender.wait("t", 10).status is TransferStatus.OK
            assert peer.dump() == expected_region(SIZE, spans, source)
    finally:
        peer.close()


def checksum_mismatch_fails(backend: str, key: bytes | None = None) -> None:
    spans = [Span(0, 0, 1 << 20), Span(2 << 20, 1 << 20, 1 << 20)]
    fault = FaultInjection("bad", (2 << 20) + 12345)
    peer = Peer("receiver", backend, SIZE, key=key)
    try:
        with make_sender(backend, fault=fault, key=key) as sender:
            sender.register_region("src", source_bytes(SIZE, 2))
            peer.call("expect", tid="bad")
            sender.post("bad", "src", peer.descriptor, spans, final=True)
            got = peer.call("wait", tid="bad", timeout=10)
            assert got["status"] == "failed", got
            assert "'bad'" in got["error"] and "checksum mismatch" in got["error"]
            assert f"dst_offset={1 << 20}" in got["error"]  # names the span
            verdict = sender.wait("bad", 10)
            assert verdict.status is TransferStatus.FAILED and verdict.error == got["error"]
    finally:
        peer.close()


def cancel_drops_late_data(backend: str) -> None:
    """Receiver cancels; a sender that has not heard keeps posting: none of it lands."""
    source = source_bytes(SIZE, 3)
    first, late = [Span(0, 0, 1 << 20)], [Span(1 << 20, 1 << 20, 1 << 20), Span(0, 2 << 20, 4096)]
    peer = Peer("receiver", backend, SIZE)
    try:
        with make_sender(backend) as sender, make_sender(backend) as unaware:
            sender.register_region("src", source)
            unaware.register_region("src", source)
            peer.call("expect", tid="c")
            sender.post("c", "src", peer.descriptor, first, final=False)
            assert peer.call("cancel", tid="c")["status"] in ("cancelled", "ok")
            # The sender hears CANCELLED (told at cancel, or when its data arrives afterwards).
            assert sender.wait("c", 10).status is TransferStatus.CANCELLED
            unaware.post("c", "src", peer.descriptor, late, final=False)
            unaware.post("c", "src", peer.descriptor, late, final=True)
            refused = unaware.wait("c", 10)
            assert refused.status is TransferStatus.CANCELLED and "already ended" in (refused.error or "")
            # A later transfer on the same connection ends OK only after every earlier frame or
            # message was handled: from here on, no late byte can still be on its way.
            peer.call("expect", tid="sync")
            unaware.post("sync", "src", peer.descriptor, [Span(0, SIZE - 10, 10)], final=True)
            assert peer.call("wait", tid="sync", timeout=10)["status"] == "ok"
            region = peer.dump()
            assert region[1 << 20 : SIZE - 10] == bytes(SIZE - 10 - (1 << 20)), "late bytes landed after cancel"
    finally:
        peer.close()


def sender_killed_fails_promptly(backend: str) -> None:
    """Receiver here; the sender process streams and is killed: wait returns FAILED at once."""
    peer = Peer("sender", backend, SIZE, seed=4)
    try:
        with make_receiver(backend) as receiver:
            dst = receiver.register_region("kv", bytearray(SIZE))
            receiver.expect("k", "kv")
            peer.call("stream", tid="k", dst=dst.to_dict(), spans=spans_json([Span(0, 0, 1 << 20)]))
            deadline = time.monotonic() + 10
            while receiver.wait("k", 0.05).nbytes == 0 and time.monotonic() < deadline:
                pass  # until some bytes landed: the kill is mid-transfer
            peer.kill()
            start = time.monotonic()
            got = receiver.wait("k", 5.0)
            assert got.status is TransferStatus.FAILED, got
            assert time.monotonic() - start < 2.0
    finally:
        peer.close()


def receiver_killed_fails_promptly(backend: str) -> None:
    peer = Peer("receiver", backend, SIZE)
    try:
        with make_sender(backend) as sender:
            sender.register_region("src", source_bytes(SIZE, 5))
            peer.call("expect", tid="r")
            sender.post("r", "src", peer.descriptor, [Span(0, 0, 1 << 20)], final=False)
            peer.kill()
            start = time.monotonic()
            got = sender.wait("r", 5.0)
            assert got.status is TransferStatus.FAILED, got
            assert time.monotonic() - start < 2.0
            # Posting to the dead peer does not raise; the transfer just ends FAILED.
            sender.post("r2", "src", peer.descriptor, [Span(0, 0, 10)], final=True)
            assert sender.wait("r2", 5.0).status is TransferStatus.FAILED
    finally:
        peer.close()


def out_of_bounds_raises(sender: TransferSender, receiver: TransferReceiver) -> None:
    """Bad input raises ValueError naming the field and changes nothing (both sides)."""
    import pytest

    region = bytearray(1000)
    dst = receiver.register_region("kv", region)
    sender.register_region("src", bytearray(b"x" * 500))
    receiver.expect("o", "kv")
    with pytest.raises(ValueError, match=r"spans\[1\] dst_offset=990 length=20 is outside destination"):
        sender.post("o", "src", dst, [Span(0, 0, 10), Span(0, 990, 20)], final=True)
    with pytest.raises(ValueError, match=r"spans\[0\] src_offset=495"):
        sender.post("o", "src", dst, [Span(495, 0, 10)], final=True)
    with pytest.raises(ValueError, match="length must be > 0"):
        sender.post("o", "src", dst, [Span(0, 0, 0)], final=True)
    with pytest.raises(ValueError, match="unknown src_region 'nope'"):
        sender.post("o", "nope", dst, [Span(0, 0, 1)], final=True)
    with pytest.raises(ValueError, match="unknown transfer_id 'o'"):
        sender.wait("o", 0.01)  # nothing was posted
    with pytest.raises(ValueError, match="unknown region 'nope'"):
        receiver.expect("p", "nope")
    with pytest.raises(ValueError, match="unknown transfer_id 'zz'"):
        receiver.wait("zz", 0.01)
    with pytest.raises(ValueError, match="unknown transfer_id 'zz'"):
        receiver.cancel("zz")
    assert receiver.wait("o", 0.05).status is TransferStatus.TIMED_OUT
    assert region == bytearray(1000)
