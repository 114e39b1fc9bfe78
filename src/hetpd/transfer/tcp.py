"""TCP transport between hosts: push over one connection per sender-receiver pair.

Wire format: every frame is a fixed header (``FRAME``), then the transfer id and a text field
(UTF-8, lengths in the header), then for DATA ``length`` payload bytes.

====== ===================== ======================================================
kind   direction             meaning
====== ===================== ======================================================
DATA   sender -> receiver    payload for ``[offset, offset + length)`` of region ``text``
                             (from ``src_offset`` of the sender's, for messages);
                             ``checksum`` = xxh3-64 of the payload
END    sender -> receiver    end of one post; flag FINAL on the last post of a transfer
CANCEL sender -> receiver    the sender cancelled the transfer
RESULT receiver -> sender    verdict: ``status``, ``length`` = verified bytes, ``text`` = error
====== ===================== ======================================================

The receiver's per-connection thread ``recv_into``s the payload straight into the region's
memoryview (no intermediate copy), holding the transfer's write lock for one read at a time
and hashing each read while it is hot; once a transfer ended (cancelled, failed, unknown),
its remaining payload is drained into a scratch buffer, never the region.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Hashable, Iterator

import xxhash

from hetpd.transfer.base import FaultInjection, RegionDescriptor, Span, TransferResult, TransferStatus
from hetpd.transfer.checksum import CHUNK_BYTES
from hetpd.transfer.core import ReceiverCore
from hetpd.transfer.ledger import TransferRecord
from hetpd.transfer.net import Conn, Listener, PeerGone
from hetpd.transfer.netsender import NetSender, Verdict

BACKEND = "tcp"
MAGIC = b"HPD1"
# magic, kind, status, flags, tid_len, text_len, dst offset, src offset (for messages), length, checksum
FRAME = struct.Struct("!4sBBHHHQQQQ")
DATA, END, CANCEL, RESULT = 1, 2, 3, 4
FLAG_FINAL = 1
_STATUS_CODE = {TransferStatus.OK: 0, TransferStatus.FAILED: 1, TransferStatus.CANCELLED: 2}
_CODE_STATUS = {code: status for status, code in _STATUS_CODE.items()}
# TCP pieces are hashed by the sender right before they are sent: keep them inside L2.
TCP_PIECE_BYTES = 1 << 20
_MAX_TEXT = 1 << 16


def _frame(kind: int, transfer_id: str, text: str = "", *, status: int = 0, flags: int = 0,
           offset: int = 0, src_offset: int = 0, length: int = 0, checksum: int = 0) -> list[bytes | memoryview]:
    tid, txt = transfer_id.encode(), text.encode()[: _MAX_TEXT - 1]
    return [FRAME.pack(MAGIC, kind, status, flags, len(tid), len(txt), offset, src_offset, length, checksum), tid, txt]


class TcpReceiver(ReceiverCore):
    """Listens on ``host:port`` (0: a free port); see ``ReceiverCore`` for the rules."""

    backend = BACKEND

    def __init__(self, host: str = "127.0.0.1", port: int = 0, io_timeout: float = 10.0, verify: bool = True) -> None:
        super().__init__()
        self._verify = verify
        self._stopping = threading.Event()
        self._listener = Listener(host, port, self._serve, io_timeout, "hetpd-tcp-recv")

    def _address(self) -> dict[str, str | int]:
        return {"host": self._listener.host, "port": self._listener.port}

    def _tell_peer(self, peer: Hashable, result: TransferResult) -> None:
        if isinstance(peer, Conn):
            try:
                peer.send(_frame(RESULT, result.transfer_id, result.error or "",
                                 status=_STATUS_CODE[result.status], length=result.nbytes))
            except PeerGone:
                pass  # the reader thread sees the loss and fails what is left

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        super().close()

    # ------------------------------------------------------------------ per connection
    def _serve(self, conn: Conn) -> None:
        header = memoryview(bytearray(FRAME.size))
        scratch = memoryview(bytearray(CHUNK_BYTES))
        stopping = self._stopping.is_set
        try:
            while True:
                conn.recv_exact(header, stopping)
                magic, kind, _, flags, tid_len, text_len, offset, src_offset, length, checksum = FRAME.unpack(header)
                if magic != MAGIC or kind not in (DATA, END, CANCEL):
                    raise PeerGone(f"bad frame (magic {magic!r}, kind {kind}): not the hetpd tcp protocol")
                transfer_id = conn.recv_bytes(tid_len, stopping).decode("utf-8", "replace")
                text = conn.recv_bytes(text_len, stopping).decode("utf-8", "replace")
                if kind == DATA:
                    self._receive(conn, transfer_id, text, Span(src_offset, offset, length), checksum, scratch)
                elif kind == END:
                    record = self._bind(transfer_id, text, conn)
                    if isinstance(record, str):
                        self._tell_peer(conn, self._refusal(transfer_id, record))
                    else:
                        self._post_done(record, bool(flags & FLAG_FINAL))
                else:
                    self._peer_cancelled(transfer_id, conn)
        except PeerGone as exc:
            self._peer_lost(conn, f"sender connection lost mid-transfer ({exc})")
        finally:
            conn.close()

    def _receive(self, conn: Conn, transfer_id: str, region: str, piece: Span, checksum: int,
                 scratch: memoryview) -> None:
        stopping = self._stopping.is_set
        record = self._bind(transfer_id, region, conn)
        pos = 0
        if not isinstance(record, str):
            with record.write_lock:
                dst = self._dst_view(record, piece) if record.result is None else None
            hasher = xxhash.xxh3_64()
            while dst is not None and pos < piece.length:
                with record.write_lock:  # one read at a time: a cancel waits at most one read
                    if record.result is not None:
                        break
                    # Reads of one L2-sized chunk when hashing (hashed while hot), else all at once.
                    window = dst[pos : pos + min(CHUNK_BYTES, piece.length - pos)] if self._verify else dst[pos:]
                    got = conn.recv_into(window, stopping)
                    if self._verify:
                        hasher.update(window[:got])
                pos += got
            else:
                if dst is not None:
                    with record.write_lock:
                        if record.result is None:
                            self._check_landed(record, piece, checksum if self._verify else 0,
                                               hasher.intdigest() if self._verify else 0)
        while pos < piece.length:  # drain what may not land
            pos += conn.recv_into(scratch[: min(len(scratch), piece.length - pos)], stopping)


class TcpSender(NetSender):
    """Pushes pieces over one connection per receiver address. ``post`` returns when the kernel
    took the bytes; a receiver that reads nothing for ``io_timeout`` seconds fails the transfer."""

    backend = BACKEND

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = TCP_PIECE_BYTES,
                 connect_timeout: float = 5.0, io_timeout: float = 10.0, verify: bool = True) -> None:
        super().__init__(fault, piece_bytes, connect_timeout, io_timeout, verify)

    def _send_post(self, record: TransferRecord, src_region: str, dst: RegionDescriptor,
                   checked: Iterator[tuple[Span, int, memoryview]], final: bool) -> None:
        tid = record.transfer_id
        try:
            conn = self._conn(dst)
            for piece, checksum, payload in checked:
                if record.result is not None:
                    return  # the receiver ended it: stop pushing
                conn.send(_frame(DATA, tid, dst.region, offset=piece.dst_offset, src_offset=piece.src_offset,
                                 length=piece.length, checksum=checksum) + [payload])
            conn.send(_frame(END, tid, dst.region, flags=FLAG_FINAL if final else 0))
        except PeerGone as exc:
            self._lost(record, exc)

    def _send_cancel_on(self, conn: Conn, transfer_id: str) -> None:
        conn.send(_frame(CANCEL, transfer_id))

    def _recv_verdict(self, conn: Conn, stopping: Callable[[], bool], key: str) -> Verdict:
        header = memoryview(bytearray(FRAME.size))
        conn.recv_exact(header, stopping)
        magic, kind, status, _, tid_len, text_len, _, _, length, _ = FRAME.unpack(header)
        if magic != MAGIC or kind != RESULT or status not in _CODE_STATUS:
            raise PeerGone(f"bad frame (magic {magic!r}, kind {kind}) from receiver {key}")
        transfer_id = conn.recv_bytes(tid_len, stopping).decode("utf-8", "replace")
        error = conn.recv_bytes(text_len, stopping).decode("utf-8", "replace") or None
        return transfer_id, _CODE_STATUS[status], length, error
