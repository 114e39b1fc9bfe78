"""Pull transports: the sender exposes its source, the receiver's process copies it in.

Shared by ``shm`` (source in a shared-memory segment) and ``nixl`` (source registered with a
NIXL agent). The sender and receiver talk over a TCP control connection carrying
length-prefixed JSON messages (never pickle):

* sender -> receiver ``{"op": "post", "tid", "region", "source", "pieces": [[src, dst, len,
  xxh3], ...], "final"}``: pieces to pull from ``source`` (a backend-specific dict);
* sender -> receiver ``{"op": "cancel", "tid"}``;
* receiver -> sender ``{"op": "result", "tid", "status", "nbytes", "error"}``.

A post message goes out per piece, right after the sender hashed it, so the receiver copies
piece *i* while the sender hashes piece *i + 1* (two processes, two cores). The receiver pulls
each piece under the transfer's write lock, so a cancel waits for at most one piece and,
once it returns, no further byte of the transfer is copied.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from hetpd.transfer.base import FaultInjection, RegionDescriptor, Span, TransferResult, TransferStatus
from hetpd.transfer.checksum import PIECE_BYTES
from hetpd.transfer.core import ReceiverCore
from hetpd.transfer.ledger import TransferRecord
from hetpd.transfer.net import Conn, Listener, PeerGone
from hetpd.transfer.netsender import NetSender, Verdict

_VERDICTS = {s.value for s in TransferStatus} - {TransferStatus.TIMED_OUT.value}


class PullReceiver(ReceiverCore):
    """Listens for control connections on ``host:port``; pulls posted pieces into its regions."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, io_timeout: float = 10.0, verify: bool = True) -> None:
        super().__init__()
        self._verify = verify
        self._stopping = threading.Event()
        self._listener = Listener(host, port, self._serve, io_timeout, f"hetpd-{self.backend}-recv")

    @abstractmethod
    def _fetch(self, conn: Conn, source: dict[str, Any], piece: Span, dst: memoryview) -> int:
        """Copy the piece's source bytes into ``dst``; return their xxh3-64 (0 if not verifying).
        Raise ValueError if ``source`` cannot be read (the transfer then fails)."""

    def _forget_peer(self, conn: Conn) -> None:
        """Release what was opened for ``conn``'s sources (mappings, remote agents)."""

    def _forget_source(self, conn: Conn, source: dict[str, Any]) -> None:
        """The sender unregistered ``source``: release what was opened for it."""

    def _address(self) -> dict[str, str | int]:
        return {"host": self._listener.host, "port": self._listener.port}

    def _tell_peer(self, peer: Hashable, result: TransferResult) -> None:
        if isinstance(peer, Conn):
            try:
                peer.send_json({"op": "result", "tid": result.transfer_id, "status": result.status.value,
                                "nbytes": result.nbytes, "error": result.error})
            except PeerGone:
                pass

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        super().close()

    def _serve(self, conn: Conn) -> None:
        try:
            while True:
                message = conn.recv_json(self._stopping.is_set)
                op, tid = message.get("op"), message.get("tid")
                if not isinstance(tid, str):
                    raise PeerGone(f"control message without a string 'tid': {str(message)[:200]}")
                if op == "post":
                    self._pull(conn, tid, message)
                elif op == "cancel":
                    self._peer_cancelled(tid, conn)
                elif op == "forget":
                    source = message.get("source")
                    if isinstance(source, dict):
                        self._forget_source(conn, source)
                else:
                    raise PeerGone(f"unknown control op {op!r}: not the hetpd pull protocol")
        except PeerGone as exc:
            self._peer_lost(conn, f"sender connection lost mid-transfer ({exc})")
        finally:
            self._forget_peer(conn)
            conn.close()

    def _pull(self, conn: Conn, tid: str, message: dict[str, Any]) -> None:
        region, source, raw_pieces = message.get("region"), message.get("source"), message.get("pieces")
        if not isinstance(region, str) or not isinstance(source, dict) or not isinstance(raw_pieces, list):
            raise PeerGone(f"malformed post message for transfer {tid!r}")
        record = self._bind(tid, region, conn)
        if isinstance(record, str):
            self._tell_peer(conn, self._refusal(tid, record))
            return
        for raw in raw_pieces:
            if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(x, int) for x in raw)):
                raise PeerGone(f"malformed piece {raw!r} in transfer {tid!r}")
            piece, checksum = Span(raw[0], raw[1], raw[2]), raw[3]
            with record.write_lock:
                if record.result is not None:
                    return  # ended (cancelled, failed): pull nothing more
                dst = self._dst_view(record, piece)
                if dst is None:
                    return
                try:
                    got = self._fetch(conn, source, piece, dst)
                except ValueError as exc:
                    self._ledger.end_locked(record, TransferStatus.FAILED, f"transfer {tid!r}: {exc}")
                    return
                if not self._check_landed(record, piece, checksum if self._verify else 0, got):
                    return
        self._post_done(record, bool(message.get("final")))


class PullSender(NetSender):
    """Exposes source regions and posts pieces over a control connection per receiver."""

    _pull = True

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = PIECE_BYTES,
                 connect_timeout: float = 5.0, io_timeout: float = 10.0, verify: bool = True) -> None:
        super().__init__(fault, piece_bytes, connect_timeout, io_timeout, verify)

    @abstractmethod
    def _source(self, src_region: str) -> dict[str, Any]:
        """What the receiver needs to read ``src_region`` (JSON-serialisable)."""

    def _send_post(self, record: TransferRecord, src_region: str, dst: RegionDescriptor,
                   checked: Iterator[tuple[Span, int, memoryview]], final: bool) -> None:
        tid = record.transfer_id
        try:
            conn = self._conn(dst)
            message: dict[str, Any] = {"op": "post", "tid": tid, "region": dst.region,
                                       "source": self._source(src_region), "pieces": [], "final": False}
            if not self._verify:  # nothing to hash, nothing to pipeline: one message
                pieces = [[p.src_offset, p.dst_offset, p.length, c] for p, c, _ in checked]
                conn.send_json({**message, "pieces": pieces, "final": final})
                return
            for piece, checksum, _ in checked:
                if record.result is not None:
                    return  # the receiver ended it
                conn.send_json({**message, "pieces": [[piece.src_offset, piece.dst_offset, piece.length, checksum]]})
            conn.send_json({**message, "final": final})
        except PeerGone as exc:
            self._lost(record, exc)

    def _send_cancel_on(self, conn: Conn, transfer_id: str) -> None:
        conn.send_json({"op": "cancel", "tid": transfer_id})

    def _tell_receivers_forget(self, src_region: str) -> None:
        """Before a source goes away, let every connected receiver drop what it opened for it
        (otherwise a long-lived receiver would keep mapping segments the sender freed)."""
        message = {"op": "forget", "tid": "", "source": self._source(src_region)}
        for conn in self._connections():
            try:
                conn.send_json(message)
            except PeerGone:
                pass

    def _recv_verdict(self, conn: Conn, stopping: Callable[[], bool], key: str) -> Verdict:
        message = conn.recv_json(stopping)
        tid, status, nbytes, error = (message.get(k) for k in ("tid", "status", "nbytes", "error"))
        if message.get("op") != "result" or not isinstance(tid, str) or status not in _VERDICTS \
                or not isinstance(nbytes, int) or not (error is None or isinstance(error, str)):
            raise PeerGone(f"malformed result message from receiver {key}")
        return tid, TransferStatus(status), nbytes, error
