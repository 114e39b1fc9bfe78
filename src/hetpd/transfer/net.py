"""Sockets for the transports: a connection with a send lock, a threaded listener, exact reads,
and length-prefixed JSON messages for control channels. Pure Python; no pickle, ever.

Every socket has a short timeout so that threads notice ``close()`` and dead peers promptly;
reads loop over timeouts until their ``stopping`` predicate says to give up, or until the
connection's ``deadline`` (set while a peer has not yet proved itself) passes.

What a stranger can make a listener spend is bounded: a connection costs one thread, and only
while fewer than ``max_conns_per_peer`` connections from its IP address and ``max_conns`` in
all are live (others are closed at accept, no thread); reads allocate as bytes arrive, never
what a length prefix merely announces.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.1  # how often a blocked read re-checks whether it should stop
SOCKET_BUFFER_BYTES = 4 << 20  # the kernel caps it at net.core.{r,w}mem_max (4 MiB here)
MAX_JSON_BYTES = 16 << 20
_JSON_LEN = struct.Struct("!I")
# Length-prefixed reads grow their buffer by at most this much per read: a 4-byte header
# announcing 16 MiB costs 16 MiB only once 16 MiB actually arrived.
_READ_STEP = 64 << 10
MAX_CONNS_PER_PEER = 8  # connections still proving themselves, per peer IP address, on one listener
MAX_CONNS = 64  # connections still proving themselves on one listener
MAX_PROVEN = 1024  # connections that proved themselves (a trusted sender each) on one listener


class PeerGone(ConnectionError):
    """The peer closed the connection, reset it, or sent something that is not the protocol."""


def tune(sock: socket.socket) -> None:
    """Large buffers (fewer wake-ups per MiB) and no Nagle delay (small control frames go now)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.settimeout(POLL_S)


class Conn:
    """One connected socket. Sends from several threads are serialised by a lock; reads belong
    to a single reader thread. Hashable by identity: it is the "peer" of transfers on it."""

    def __init__(self, sock: socket.socket, io_timeout: float) -> None:
        self.sock = sock
        self.io_timeout = io_timeout  # a send blocked this long means a dead or stuck peer
        self.closed = threading.Event()
        self._send_lock = threading.Lock()
        # time.monotonic() by which reads must be done, while the peer has not yet proved it
        # speaks the protocol (handshake, first frame); None once it has.
        self.deadline: float | None = None

    def send(self, parts: list[bytes | memoryview]) -> None:
        """Send all of ``parts`` (one sendmsg per round, no joining copy). Raises PeerGone."""
        if self.closed.is_set():
            raise PeerGone("connection already closed")
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        with self._send_lock:
            deadline = time.monotonic() + self.io_timeout
            try:
                while views:
                    try:
                        sent = self.sock.sendmsg(views)
                    except TimeoutError:
                        # Nothing was sent. A peer that reads nothing for io_timeout is gone.
                        if time.monotonic() > deadline:
                            raise
                        continue
                    deadline = time.monotonic() + self.io_timeout
                    while views and sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    if sent:
                        views[0] = views[0][sent:]
            except OSError as exc:
                self.close()
                raise PeerGone(f"send failed: {exc}") from exc

    def recv_into(self, view: memoryview, stopping: Callable[[], bool]) -> int:
        """One read of up to ``len(view)`` bytes (>= 1). Raises PeerGone on EOF, error or stop."""
        while True:
            if stopping() or self.closed.is_set():
                raise PeerGone("stopped")
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise PeerGone("read deadline passed (handshake or first frame not complete in time)")
            try:
                got = self.sock.recv_into(view)
            except TimeoutError:
                continue
            except OSError as exc:
                raise PeerGone(f"receive failed: {exc}") from exc
            if got == 0:
                raise PeerGone("peer closed the connection")
            return got

    def recv_exact(self, view: memoryview, stopping: Callable[[], bool]) -> None:
        pos = 0
        while pos < len(view):
            pos += self.recv_into(view[pos:], stopping)

    def recv_bytes(self, count: int, stopping: Callable[[], bool]) -> bytes:
        """Exactly ``count`` bytes. The buffer grows with what arrived (``_READ_STEP`` at a
        time), so a peer that announces much and sends little makes us allocate little."""
        if count <= _READ_STEP:
            buffer = bytearray(count)
            self.recv_exact(memoryview(buffer), stopping)
            return bytes(buffer)
        out = bytearray()
        step = memoryview(bytearray(_READ_STEP))
        while len(out) < count:
            got = self.recv_into(step[: min(_READ_STEP, count - len(out))], stopping)
            out += step[:got]
        return bytes(out)

    def send_json(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        self.send([_JSON_LEN.pack(len(body)), body])

    def recv_json(self, stopping: Callable[[], bool], limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
        """The next length-prefixed JSON object; PeerGone if it announces more than ``limit``
        bytes (before reading any of them), is not JSON, or is not an object."""
        (size,) = _JSON_LEN.unpack(self.recv_bytes(_JSON_LEN.size, stopping))
        if size > limit:
            raise PeerGone(f"control message of {size} bytes exceeds {limit}: not our protocol")
        try:
            message = json.loads(self.recv_bytes(size, stopping))
        except ValueError as exc:
            raise PeerGone(f"control message is not JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise PeerGone("control message is not a JSON object")
        return message

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def connect(host: str, port: int, timeout: float, io_timeout: float) -> Conn:
    sock = socket.create_connection((host, port), timeout=timeout)
    tune(sock)
    return Conn(sock, io_timeout)


def reader_thread(conn: Conn, target: Callable[[Conn], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=(conn,), name=name, daemon=True)
    thread.start()
    return thread


class Listener:
    """Accepts connections on ``host:port`` (0: any free port) and runs ``handler(conn)`` on a
    thread per connection; the handler owns reads and returns when the peer is gone (the
    connection is then closed and forgotten, and its thread ends).

    With ``prove_within``, every new connection gets that long (``conn.deadline``) to prove
    itself; the handler clears the deadline once it has. At most ``max_conns_per_peer``
    connections still proving themselves per peer IP address and ``max_conns`` in all, and
    ``max_proven`` proven ones: a connection beyond a cap is closed at accept, without a thread
    (``refused`` counts them), so a stranger opening sockets in a loop costs file descriptors
    briefly, not threads, while any number of trusted senders on one host (several prefill
    workers behind one address) are not held to the strangers' cap.
    """

    def __init__(self, host: str, port: int, handler: Callable[[Conn], None], io_timeout: float, name: str,
                 *, max_conns_per_peer: int = MAX_CONNS_PER_PEER, max_conns: int = MAX_CONNS,
                 max_proven: int = MAX_PROVEN, prove_within: float | None = None) -> None:
        for value, what in ((max_conns_per_peer, "max_conns_per_peer"), (max_conns, "max_conns"),
                            (max_proven, "max_proven")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be an int >= 1, got {value!r}")
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(POLL_S)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._handler = handler
        self._io_timeout = io_timeout
        self._name = name
        self._max_per_peer = max_conns_per_peer
        self._max_conns = max_conns
        self._max_proven = max_proven
        self._prove_within = prove_within
        self.accepted = 0  # connections given a thread, in all
        self.refused = 0  # connections closed at accept because a cap was reached
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[Conn, tuple[str, threading.Thread]] = {}  # conn -> (peer IP, its thread)
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def live(self) -> int:
        """Connections whose handler is still running."""
        with self._lock:
            return len(self._live)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            ip = str(address[0])
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                proving = [peer_ip for c, (peer_ip, _) in self._live.items()
                           if self._prove_within is None or c.deadline is not None]
                if proving.count(ip) >= self._max_per_peer or len(proving) >= self._max_conns \
                        or len(self._live) - len(proving) >= self._max_proven:
                    self.refused += 1
                    sock.close()
                    continue
                tune(sock)
                conn = Conn(sock, self._io_timeout)
                if self._prove_within is not None:
                    conn.deadline = time.monotonic() + self._prove_within
                thread = threading.Thread(target=self._run, args=(conn,), name=f"{self._name}-conn", daemon=True)
                self._live[conn] = (ip, thread)
                self.accepted += 1
                thread.start()

    def _run(self, conn: Conn) -> None:
        try:
            self._handler(conn)
        finally:
            conn.close()
            with self._lock:
                self._live.pop(conn, None)

    def close(self) -> None:
        self._stopping.set()
        self._sock.close()
        self._thread.join(timeout=2)
        with self._lock:
            live = list(self._live.items())
        for conn, (_, thread) in live:
            conn.close()
            thread.join(timeout=2)
