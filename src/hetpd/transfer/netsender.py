"""The sender half shared by the network backends (tcp push, shm and nixl pull). Pure Python.

One connection per receiver (address and token), opened on first post, with a reader thread
that turns the receiver's verdicts into results; losing the connection fails every live
transfer bound to it. With a key, a new connection first runs the handshake
(``auth.sender_handshake``): no KV byte and no post goes out before the receiver proved it
knows the key, and a failed handshake fails the transfer at once, saying "authentication
failed". Subclasses say how a cancel and a verdict look on the wire.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Hashable

from hetpd.transfer.auth import AuthFailed, check_timeout, sender_handshake
from hetpd.transfer.base import FaultInjection, RegionDescriptor, TransferStatus
from hetpd.transfer.core import SenderCore
from hetpd.transfer.ledger import TransferRecord
from hetpd.transfer.net import Conn, PeerGone, connect, reader_thread

Verdict = tuple[str, TransferStatus, int, str | None]  # transfer id, status, nbytes, error


class NetSender(SenderCore):
    def __init__(self, fault: FaultInjection | None, piece_bytes: int, connect_timeout: float, io_timeout: float,
                 verify: bool, key: bytes | None, handshake_timeout: float) -> None:
        super().__init__(fault, piece_bytes, verify, key)
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._handshake_timeout = check_timeout(handshake_timeout, "handshake_timeout")
        self._conns: dict[str, tuple[Conn, threading.Thread]] = {}
        self._conns_lock = threading.Lock()
        # One lock per receiver while connecting to it, so a slow handshake with one receiver
        # does not hold up posts to the others.
        self._dialing: dict[str, threading.Lock] = {}
        self._stopping = threading.Event()

    @abstractmethod
    def _send_cancel_on(self, conn: Conn, transfer_id: str) -> None:
        """Write a cancel for ``transfer_id``; may raise PeerGone."""

    @abstractmethod
    def _recv_verdict(self, conn: Conn, stopping: Callable[[], bool], key: str) -> Verdict:
        """Read the next verdict; raise PeerGone on loss or anything that is not the protocol."""

    def _peer_key(self, dst: RegionDescriptor) -> Hashable:
        # The token too: a connection is authenticated to one receiver, not to a port.
        return f"{dst.address.get('host')}:{dst.address.get('port')}/{dst.address.get('receiver', '')}"

    def _live_conn(self, key: str) -> Conn | None:
        with self._conns_lock:
            known = self._conns.get(key)
            return known[0] if known is not None and not known[0].closed.is_set() else None

    def _conn(self, dst: RegionDescriptor) -> Conn:
        """The connection to ``dst``'s receiver, opened (and authenticated, with a key) if
        needed. Raises PeerGone, AuthFailed if the handshake failed."""
        key = str(self._peer_key(dst))
        conn = self._live_conn(key)
        if conn is not None:
            return conn
        with self._conns_lock:
            dialing = self._dialing.setdefault(key, threading.Lock())
        with dialing:
            conn = self._live_conn(key)  # another post may have connected meanwhile
            if conn is not None:
                return conn
            host, port = dst.address.get("host"), dst.address.get("port")
            if not isinstance(host, str) or not isinstance(port, int):
                raise PeerGone(f"dst region {dst.region!r} has no host/port in its address {dst.address}")
            try:
                conn = connect(host, port, self._connect_timeout, self._io_timeout)
            except OSError as exc:
                raise PeerGone(f"cannot connect to receiver {key}: {exc}") from exc
            if self._key is not None:
                try:
                    sender_handshake(conn, self._key, str(dst.address.get("receiver", "")), self._handshake_timeout,
                                     self._stopping.is_set)
                except PeerGone as exc:
                    conn.close()
                    if isinstance(exc, AuthFailed):
                        raise
                    raise AuthFailed(f"authentication failed: connection to receiver {key} lost during the "
                                     f"handshake ({exc})") from exc
            with self._conns_lock:
                if self._stopping.is_set():
                    conn.close()
                    raise PeerGone("sender closed")
                thread = reader_thread(conn, lambda c: self._read_verdicts(c, key), f"hetpd-{self.backend}-send")
                self._conns[key] = (conn, thread)
            return conn

    def _connections(self) -> list[Conn]:
        with self._conns_lock:
            return [conn for conn, _ in self._conns.values()]

    def _lost(self, record: TransferRecord, exc: PeerGone) -> None:
        if isinstance(exc, AuthFailed):  # nothing was sent: say so, not "connection lost"
            why = f"transfer {record.transfer_id!r} to receiver {record.peer}: {exc}"
        else:
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
