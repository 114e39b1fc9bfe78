"""Pull transports: the sender exposes its source, the receiver's process copies it in.

Shared by ``shm`` (source in a shared-memory segment) and ``nixl`` (source registered with a
NIXL agent). The sender and receiver talk over a TCP control connection (with a key, opened by
the handshake of ``auth``) carrying length-prefixed JSON messages (never pickle):

* sender -> receiver ``{"op": "post", "tid", "region", "source", "pieces": [[src, dst, len,
  digest], ...], "final", "tag"}``: pieces to pull from ``source`` (a backend-specific dict);
  ``digest`` is the hex of the piece's xxh3-64, or with a key of its keyed BLAKE3 MAC;
  ``tag`` (hex, with a key) is the transfer's tag (its final tag when ``final``), checked
  before the post binds the transfer or a byte is pulled; a wrong one closes the connection;
* sender -> receiver ``{"op": "cancel", "tid"}`` (acts on transfers bound to this connection)
  and ``{"op": "forget", "tid": "", "source"}`` (release what was opened for a source);
* receiver -> sender ``{"op": "result", "tid", "status", "nbytes", "error"}``.

Without a key the first message on a connection may be at most ``FIRST_JSON_BYTES`` and must
arrive whole within the handshake timeout; later ones (and all, after a handshake) at most
``MAX_JSON_BYTES``, buffered as they arrive. A sender keeps every message small anyway: at
most ``PIECES_PER_MESSAGE`` pieces each.

A post message goes out per piece, right after the sender hashed it, so the receiver copies
piece *i* while the sender hashes piece *i + 1* (two processes, two cores). The receiver pulls
each piece under the transfer's write lock, so a cancel waits for at most one piece and,
once it returns, no further byte of the transfer is copied.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from hetpd.transfer.auth import HANDSHAKE_TIMEOUT_S
from hetpd.transfer.base import FaultInjection, RegionDescriptor, Span, TransferResult, TransferStatus
from hetpd.transfer.checksum import PIECE_BYTES, Hasher
from hetpd.transfer.ledger import TransferRecord
from hetpd.transfer.net import MAX_CONNS, MAX_CONNS_PER_PEER, MAX_JSON_BYTES, Conn, PeerGone
from hetpd.transfer.netreceiver import NetReceiver
from hetpd.transfer.netsender import NetSender, Verdict

_VERDICTS = {s.value for s in TransferStatus} - {TransferStatus.TIMED_OUT.value}
_OPS = ("post", "cancel", "forget")
FIRST_JSON_BYTES = 1 << 20  # a keyless peer's first message: enough for any post we send
PIECES_PER_MESSAGE = 4096  # ~300 KiB of JSON with MACs: every message well under FIRST_JSON_BYTES


def _unhex(value: object) -> bytes | None:
    """Bytes from a hex string, None if ``value`` is not one."""
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


class PullReceiver(NetReceiver):
    """Listens for control connections on ``host:port``; pulls posted pieces into its regions.
    See ``NetReceiver`` for ``key``, ``handshake_timeout`` and the connection caps."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 max_conns_per_peer: int = MAX_CONNS_PER_PEER, max_conns: int = MAX_CONNS) -> None:
        super().__init__(host, port, io_timeout, verify, key=key, handshake_timeout=handshake_timeout,
                         max_conns_per_peer=max_conns_per_peer, max_conns=max_conns)

    @abstractmethod
    def _fetch(self, conn: Conn, source: dict[str, Any], piece: Span, dst: memoryview, hasher: Hasher | None) -> bytes:
        """Copy the piece's source bytes into ``dst``; return the digest ``hasher`` took of what
        landed (b"" without one). Raise ValueError if ``source`` cannot be read (the transfer
        then fails)."""

    def _forget_source(self, conn: Conn, source: dict[str, Any]) -> None:
        """The sender unregistered ``source``: release what was opened for it."""

    def _tell_peer(self, peer: Hashable, result: TransferResult) -> None:
        if isinstance(peer, Conn):
            try:
                peer.send_json({"op": "result", "tid": result.transfer_id, "status": result.status.value,
                                "nbytes": result.nbytes, "error": result.error})
            except PeerGone:
                pass

    def _serve_peer(self, conn: Conn) -> None:
        # Before the peer proved itself (keyless: its first message), a small frame only.
        limit = FIRST_JSON_BYTES if self._key is None else MAX_JSON_BYTES
        while True:
            message = conn.recv_json(self._stopping.is_set, limit)
            op, tid = message.get("op"), message.get("tid")
            if not isinstance(tid, str):
                raise PeerGone(f"control message without a string 'tid': {str(message)[:200]}")
            if op not in _OPS:
                raise PeerGone(f"unknown control op {op!r}: not the hetpd pull protocol")
            conn.deadline, limit = None, MAX_JSON_BYTES
            if op == "post":
                self._pull(conn, tid, message)
            elif op == "cancel":
                self._peer_cancelled(tid, conn)
            else:
                source = message.get("source")
                if isinstance(source, dict):
                    self._forget_source(conn, source)

    def _pull(self, conn: Conn, tid: str, message: dict[str, Any]) -> None:
        region, source, raw_pieces = message.get("region"), message.get("source"), message.get("pieces")
        if not isinstance(region, str) or not isinstance(source, dict) or not isinstance(raw_pieces, list):
            raise PeerGone(f"malformed post message for transfer {tid!r}")
        final = bool(message.get("final"))
        tag = _unhex(message.get("tag", ""))
        if tag is None or not self._tag_ok(tid, tag, final):
            raise PeerGone(f"post for transfer {tid!r} carries a wrong tag: dropped the connection")
        record = self._bind(tid, region, conn)
        if isinstance(record, str):
            self._tell_peer(conn, self._refusal(tid, record))
            return
        for raw in raw_pieces:
            checksum = _unhex(raw[3]) if isinstance(raw, list) and len(raw) == 4 else None
            if checksum is None or not all(isinstance(x, int) for x in raw[:3]):
                raise PeerGone(f"malformed piece {str(raw)[:200]} in transfer {tid!r}")
            piece = Span(raw[0], raw[1], raw[2])
            with record.write_lock:
                if record.result is not None:
                    return  # ended (cancelled, failed): pull nothing more
                dst = self._dst_view(record, piece)
                if dst is None:
                    return
                try:
                    got = self._fetch(conn, source, piece, dst, self._hasher(record, piece))
                except ValueError as exc:
                    self._ledger.end_locked(record, TransferStatus.FAILED, f"transfer {tid!r}: {exc}")
                    return
                if not self._check_landed(record, piece, checksum, got):
                    return
        self._post_done(record, final)


class PullSender(NetSender):
    """Exposes source regions and posts pieces over a control connection per receiver."""

    _pull = True

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = PIECE_BYTES,
                 connect_timeout: float = 5.0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        super().__init__(fault, piece_bytes, connect_timeout, io_timeout, verify, key, handshake_timeout)

    @abstractmethod
    def _source(self, src_region: str) -> dict[str, Any]:
        """What the receiver needs to read ``src_region`` (JSON-serialisable)."""

    def _send_post(self, record: TransferRecord, src_region: str, dst: RegionDescriptor,
                   checked: Iterator[tuple[Span, bytes, memoryview]], final: bool) -> None:
        tid = record.transfer_id
        auth = record.auth
        post_tag, final_tag = (auth.tag(False).hex(), auth.tag(final).hex()) if auth is not None else ("", "")
        try:
            conn = self._conn(dst)
            message: dict[str, Any] = {"op": "post", "tid": tid, "region": dst.region,
                                       "source": self._source(src_region), "pieces": [], "final": False,
                                       "tag": post_tag}
            if not self._verify:  # nothing to hash, nothing to pipeline: few, bounded messages
                pieces = [[p.src_offset, p.dst_offset, p.length, ""] for p, _, _ in checked]
                for start in range(0, len(pieces), PIECES_PER_MESSAGE):
                    conn.send_json({**message, "pieces": pieces[start : start + PIECES_PER_MESSAGE]})
                conn.send_json({**message, "final": final, "tag": final_tag})
                return
            for piece, checksum, _ in checked:
                if record.result is not None:
                    return  # the receiver ended it
                conn.send_json({**message, "pieces": [[piece.src_offset, piece.dst_offset, piece.length,
                                                       checksum.hex()]]})
            conn.send_json({**message, "final": final, "tag": final_tag})
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
