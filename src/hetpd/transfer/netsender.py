"""The sender half shared by the network backends (tcp push, shm and nixl pull). Pure Python.

One connection per receiver address, opened on first post, with a reader thread that turns
the receiver's verdicts into results; losing the connection fails every live transfer bound
to it. Subclasses say how a cancel and a verdict look on the wire.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Hashable

from hetpd.transfer.base import FaultInjection, RegionDescriptor, TransferStatus
from hetpd.transfer.core import SenderCore
from hetpd.transfer.ledger import TransferRecord
from hetpd.transfer.net import Conn, PeerGone, connect, reader_thread

Verdict = tuple[str, TransferStatus, int, str | None]  # transfer id, status, nbytes, error


class NetSender(SenderCore):
    def __init__(self, fault: FaultInjection | None, piece_bytes: int, connect_timeout: float, io_timeout: float,
                 verify: bool) -> None:
        super().__init__(fault, piece_bytes, verify)
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._conns: dict[str, tuple[Conn, threading.Thread]] = {}
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()

    @abstractmethod
    def _send_cancel_on(self, conn: Conn, transfer_id: str) -> None:
        """Write a cancel for ``transfer_id``; may raise PeerGone."""

    @abstractmethod
    def _recv_verdict(self, conn: Conn, stopping: Callable[[], bool], key: str) -> Verdict:
        """Read the next verdict; raise PeerGone on loss or anything that is not the protocol."""

    def _peer_key(self, dst: RegionDescriptor) -> Hashable:
        return f"{dst.address.get('host')}:{dst.address.get('port')}"

    def _conn(self, dst: RegionDescriptor) -> Conn:
        """The connection to ``dst``'s receiver, opened if needed. Raises PeerGone."""
        key = str(self._peer_key(dst))
        with self._conns_lock:
            known = self._conns.get(key)
            if known is not None and not known[0].closed.is_set():
                return known[0]
            host, port = dst.address.get("host"), dst.address.get("port")
            if not isinstance(host, str) or not isinstance(port, int):
                raise PeerGone(f"dst region {dst.region!r} has no host/port in its address {dst.address}")
            try:
                conn = connect(host, port, self._connect_timeout, self._io_timeout)
            except OSError as exc:
                raise PeerGone(f"cannot connect to receiver {key}: {exc}") from exc
            thread = reader_thread(conn, lambda c: self._read_verdicts(c, key), f"hetpd-{self.backend}-send")
            self._conns[key] = (conn, thread)
            return conn

    def _connections(self) -> list[Conn]:
        with self._conns_lock:
            return [conn for conn, _ in self._conns.values()]

    def _lost(self, record: TransferRecord, exc: PeerGone) -> None:
        why = f"transfer {record.transfer_id!r}: connection to receiver lost ({exc})"
        self._peer_lost(record.peer or "", why)
        self._fail(record, why)

    def _send_cancel(self, record: TransferRecord) -> None:
        with self._conns_lock:
            known = self._conns.get(str(record.peer))
        if known is not None:
            try:
                self._send_cancel_on(known[0], record.transfer_id)
            except PeerGone:
                pass  # the reader thread fails what is left

    def _read_verdicts(self, conn: Conn, key: str) -> None:
        try:
            while True:
                self._verdict(*self._recv_verdict(conn, self._stopping.is_set, key))
        except PeerGone as exc:
            with self._conns_lock:
                current = self._conns.get(key)
            if current is None or current[0] is conn:  # a newer connection's transfers are not ours
                self._peer_lost(key, f"connection to receiver {key} lost ({exc})")
        finally:
            conn.close()

    def close(self) -> None:
        self._stopping.set()
        with self._conns_lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn, thread in conns:
            conn.close()
            thread.join(timeout=2)
        super().close()
