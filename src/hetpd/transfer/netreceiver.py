"""The receiver half shared by the network backends (tcp push, shm and nixl pull). Pure Python.

A listener with bounded resources (``net.Listener``: a thread per connection; of the
connections still proving themselves at most ``max_conns_per_peer`` per peer IP and
``max_conns`` in all), and the life of one connection:

1. it must prove itself within ``handshake_timeout`` seconds: with a key, by the mutual
   handshake (``auth.receiver_handshake``: one fixed-size frame read, nothing else allocated);
   without one, by sending a complete, valid first frame (the backend clears the deadline
   then). Otherwise it is closed and its thread ends;
2. then the backend reads its frames (``_serve_peer``) until the peer goes or breaks the
   protocol; losing it fails the transfers bound to it, and nothing else.

Once authenticated a connection may stay idle: a sender keeps one connection per receiver
between transfers, and the caps bound what idle ones hold.
"""

from __future__ import annotations

import threading
from abc import abstractmethod

from hetpd.transfer.auth import HANDSHAKE_TIMEOUT_S, check_timeout, receiver_handshake
from hetpd.transfer.core import ReceiverCore
from hetpd.transfer.net import MAX_CONNS, MAX_CONNS_PER_PEER, Conn, Listener, PeerGone


class NetReceiver(ReceiverCore):
    """Listens on ``host:port`` (0: a free port); see ``ReceiverCore`` for the transfer rules."""

    def __init__(self, host: str, port: int, io_timeout: float, verify: bool, *, key: bytes | None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S, max_conns_per_peer: int = MAX_CONNS_PER_PEER,
                 max_conns: int = MAX_CONNS) -> None:
        super().__init__(key)
        self._verify = verify
        self._handshake_timeout = check_timeout(handshake_timeout, "handshake_timeout")
        self._stopping = threading.Event()
        self._listener = Listener(host, port, self._serve, io_timeout, f"hetpd-{self.backend}-recv",
                                  max_conns_per_peer=max_conns_per_peer, max_conns=max_conns,
                                  prove_within=self._handshake_timeout)

    @abstractmethod
    def _serve_peer(self, conn: Conn) -> None:
        """Read and handle the connection's frames until PeerGone. Set ``conn.deadline = None``
        once a frame proved the peer speaks the protocol (it is set until then, keyless)."""

    def _forget_peer(self, conn: Conn) -> None:
        """Release what was opened for ``conn`` (pull backends: mappings, remote agents)."""

    def _address(self) -> dict[str, str | int]:
        return {"host": self._listener.host, "port": self._listener.port}

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        super().close()

    def _serve(self, conn: Conn) -> None:
        # conn.deadline was set at accept (prove_within): the handshake or first frame clears it.
        try:
            if self._key is not None:
                receiver_handshake(conn, self._key, self.token, self._stopping.is_set)
            self._serve_peer(conn)
        except PeerGone as exc:
            # A connection that never bound a transfer fails nothing here.
            self._peer_lost(conn, f"sender connection lost mid-transfer ({exc})")
        finally:
            self._forget_peer(conn)
            conn.close()
