"""TCP transport between hosts: push over one connection per sender-receiver pair.

Wire format (protocol 2, magic ``HPD2``): with a key, a connection starts with the handshake
of ``auth``; then every frame is a fixed header (``FRAME``), then the transfer id and a text
field (UTF-8, lengths in the header), then for DATA ``length`` payload bytes.

====== ===================== ======================================================
kind   direction             meaning
====== ===================== ======================================================
DATA   sender -> receiver    payload for ``[offset, offset + length)`` of region ``text``
                             (from ``src_offset`` of the sender's, for messages);
                             ``checksum`` = xxh3-64 of the payload (8 bytes, zero-padded),
                             or with a key the piece's keyed BLAKE3 MAC (32 bytes)
END    sender -> receiver    end of one post; flag FINAL on the last post of a transfer
CANCEL sender -> receiver    the sender cancelled the transfer (acts only on transfers
                             bound to this connection)
RESULT receiver -> sender    verdict: ``status``, ``length`` = verified bytes, ``text`` = error
====== ===================== ======================================================

With a key, DATA and END carry the transfer's ``tag`` (``auth.TransferAuth``; the final END
its final tag), checked before the frame binds the transfer or a payload byte is read into
a region; a frame with a wrong tag closes the connection (its payload is never read).

The receiver's per-connection thread ``recv_into``s the payload straight into the region's
memoryview (no intermediate copy), holding the transfer's write lock for one read at a time
and hashing each read while it is hot; once a transfer ended (cancelled, failed, unknown),
its remaining payload is drained into a scratch buffer (allocated at the first drain), never
the region.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Iterator

from hetpd.transfer.auth import HANDSHAKE_TIMEOUT_S, TAG_BYTES
from hetpd.transfer.base import FaultInjection, RegionDescriptor, Span, TransferResult, TransferStatus
from hetpd.transfer.checksum import CHUNK_BYTES, DIGEST_FIELD_BYTES
from hetpd.transfer.ledger import TransferRecord
from hetpd.transfer.net import MAX_CONNS, MAX_CONNS_PER_PEER, Conn, PeerGone
from hetpd.transfer.netreceiver import NetReceiver
from hetpd.transfer.netsender import NetSender, Verdict

BACKEND = "tcp"
MAGIC = b"HPD2"  # protocol 2: 32-byte checksum field and a tag (HPD1 had an 8-byte checksum)
# magic, kind, status, flags, tid_len, text_len, dst offset, src offset (for messages), length, checksum, tag
FRAME = struct.Struct(f"!4sBBHHHQQQ{DIGEST_FIELD_BYTES}s{TAG_BYTES}s")
DATA, END, CANCEL, RESULT = 1, 2, 3, 4
FLAG_FINAL = 1
_STATUS_CODE = {TransferStatus.OK: 0, TransferStatus.FAILED: 1, TransferStatus.CANCELLED: 2}
_CODE_STATUS = {code: status for status, code in _STATUS_CODE.items()}
# TCP pieces are hashed by the sender right before they are sent: keep them inside L2.
TCP_PIECE_BYTES = 1 << 20
_MAX_TEXT = 1 << 16


def _frame(kind: int, transfer_id: str, text: str = "", *, status: int = 0, flags: int = 0, offset: int = 0,
           src_offset: int = 0, length: int = 0, checksum: bytes = b"", tag: bytes = b""
           ) -> list[bytes | memoryview]:
    tid, txt = transfer_id.encode(), text.encode()[: _MAX_TEXT - 1]
    return [FRAME.pack(MAGIC, kind, status, flags, len(tid), len(txt), offset, src_offset, length, checksum, tag),
            tid, txt]


class TcpReceiver(NetReceiver):
    """Listens on ``host:port`` (0: a free port); see ``ReceiverCore`` for the rules and
    ``NetReceiver`` for ``key``, ``handshake_timeout`` and the connection caps."""

    backend = BACKEND

    def __init__(self, host: str = "127.0.0.1", port: int = 0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 max_conns_per_peer: int = MAX_CONNS_PER_PEER, max_conns: int = MAX_CONNS) -> None:
        super().__init__(host, port, io_timeout, verify, key=key, handshake_timeout=handshake_timeout,
                         max_conns_per_peer=max_conns_per_peer, max_conns=max_conns)

    def _tell_peer(self, peer: Hashable, result: TransferResult) -> None:
        if isinstance(peer, Conn):
            try:
                peer.send(_frame(RESULT, result.transfer_id, result.error or "",
                                 status=_STATUS_CODE[result.status], length=result.nbytes))
            except PeerGone:
                pass  # the reader thread sees the loss and fails what is left

    # ------------------------------------------------------------------ per connection
    def _serve_peer(self, conn: Conn) -> None:
        header = memoryview(bytearray(FRAME.size))
        scratch: memoryview | None = None  # for payload that may not land: made at the first drain
        stopping = self._stopping.is_set
        while True:
            conn.recv_exact(header, stopping)
            magic, kind, _, flags, tid_len, text_len, offset, src_offset, length, checksum, tag = FRAME.unpack(header)
            if magic != MAGIC or kind not in (DATA, END, CANCEL):
                raise PeerGone(f"bad frame (magic {magic!r}, kind {kind}): not the hetpd tcp protocol")
            transfer_id = conn.recv_bytes(tid_len, stopping).decode("utf-8", "replace")
            text = conn.recv_bytes(text_len, stopping).decode("utf-8", "replace")
            conn.deadline = None  # a whole valid frame: the peer speaks the protocol
            final = kind == END and bool(flags & FLAG_FINAL)
            if kind != CANCEL and not self._tag_ok(transfer_id, tag, final):
                raise PeerGone(f"frame for transfer {transfer_id!r} carries a wrong tag: dropped the connection")
            if kind == DATA:
                piece = Span(src_offset, offset, length)
                landed = self._receive(conn, transfer_id, text, piece, checksum)
                if landed < length:
                    if scratch is None:
                        scratch = memoryview(bytearray(CHUNK_BYTES))
                    while landed < length:  # drain what may not land
                        landed += conn.recv_into(scratch[: min(len(scratch), length - landed)], stopping)
            elif kind == END:
                record = self._bind(transfer_id, text, conn)
                if isinstance(record, str):
                    self._tell_peer(conn, self._refusal(transfer_id, record))
                else:
                    self._post_done(record, final)
            else:
                self._peer_cancelled(transfer_id, conn)

    def _receive(self, conn: Conn, transfer_id: str, region: str, piece: Span, checksum: bytes) -> int:
        """Read the piece's payload into its region while the transfer lives; returns how many
        payload bytes were read (the caller drains the rest)."""
        stopping = self._stopping.is_set
        record = self._bind(transfer_id, region, conn)
        pos = 0
        if isinstance(record, str):
            return pos
        with record.write_lock:
            dst = self._dst_view(record, piece) if record.result is None else None
        hasher = self._hasher(record, piece)
        while dst is not None and pos < piece.length:
            with record.write_lock:  # one read at a time: a cancel waits at most one read
                if record.result is not None:
                    break
                # Reads of one L2-sized chunk when hashing (hashed while hot), else all at once.
                window = dst[pos : pos + min(CHUNK_BYTES, piece.length - pos)] if hasher is not None else dst[pos:]
                got = conn.recv_into(window, stopping)
                if hasher is not None:
                    hasher.update(window[:got])
            pos += got
        else:
            if dst is not None:
                with record.write_lock:
                    if record.result is None:
                        got_digest = b"" if hasher is None else hasher.digest()
                        self._check_landed(record, piece, checksum[: len(got_digest)], got_digest)
        return pos


class TcpSender(NetSender):
    """Pushes pieces over one connection per receiver address. ``post`` returns when the kernel
    took the bytes; a receiver that reads nothing for ``io_timeout`` seconds fails the transfer."""

    backend = BACKEND

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = TCP_PIECE_BYTES,
                 connect_timeout: float = 5.0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        super().__init__(fault, piece_bytes, connect_timeout, io_timeout, verify, key, handshake_timeout)

    def _send_post(self, record: TransferRecord, src_region: str, dst: RegionDescriptor,
                   checked: Iterator[tuple[Span, bytes, memoryview]], final: bool) -> None:
        tid = record.transfer_id
        post_tag = record.auth.tag(final=False) if record.auth is not None else b""
        end_tag = record.auth.tag(final) if record.auth is not None else b""
        try:
            conn = self._conn(dst)
            for piece, checksum, payload in checked:
                if record.result is not None:
                    return  # the receiver ended it: stop pushing
                conn.send(_frame(DATA, tid, dst.region, offset=piece.dst_offset, src_offset=piece.src_offset,
                                 length=piece.length, checksum=checksum, tag=post_tag) + [payload])
            conn.send(_frame(END, tid, dst.region, flags=FLAG_FINAL if final else 0, tag=end_tag))
        except PeerGone as exc:
            self._lost(record, exc)

    def _send_cancel_on(self, conn: Conn, transfer_id: str) -> None:
        conn.send(_frame(CANCEL, transfer_id))

    def _recv_verdict(self, conn: Conn, stopping: Callable[[], bool], key: str) -> Verdict:
        header = memoryview(bytearray(FRAME.size))
        conn.recv_exact(header, stopping)
        magic, kind, status, _, tid_len, text_len, _, _, length, _, _ = FRAME.unpack(header)
        if magic != MAGIC or kind != RESULT or status not in _CODE_STATUS:
            raise PeerGone(f"bad frame (magic {magic!r}, kind {kind}) from receiver {key}")
        transfer_id = conn.recv_bytes(tid_len, stopping).decode("utf-8", "replace")
        error = conn.recv_bytes(text_len, stopping).decode("utf-8", "replace") or None
        return transfer_id, _CODE_STATUS[status], length, error
