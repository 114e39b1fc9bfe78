"""Raw clients for the auth and limits tests: plain sockets that speak the protocol badly, not at
all, or (with the key) well enough to reach the checks behind the handshake. No mocks."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

from hetpd.transfer import RegionDescriptor
from hetpd.transfer.auth import CHALLENGE, CHALLENGE_MAGIC, HELLO, WELCOME, WELCOME_MAGIC, sender_handshake
from hetpd.transfer.net import Conn, connect
from hetpd.transfer.tcp import DATA, END, FLAG_FINAL, FRAME, MAGIC


def address(dst: RegionDescriptor) -> tuple[str, int]:
    return str(dst.address["host"]), int(dst.address["port"])


def raw_connect(dst: RegionDescriptor, source_ip: str | None = None) -> socket.socket:
    """A plain TCP connection to ``dst``'s listener, from ``source_ip`` (another 127.x address
    counts as another peer) if given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source_ip is not None:
        sock.bind((source_ip, 0))
    sock.settimeout(5.0)
    sock.connect(address(dst))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the listener closes ``sock`` within ``seconds`` (whatever it sent first, e.g. a
    challenge, is read and dropped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def closed_without_reply(sock: socket.socket, seconds: float) -> bool:
    """Whether the listener closes ``sock`` within ``seconds`` without sending a byte (e.g. no
    WELCOME after a wrong answer to its challenge)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_challenge(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < CHALLENGE.size:
        chunk = sock.recv(CHALLENGE.size - len(data))
        assert chunk, "listener closed before sending its challenge"
        data += chunk
    assert data[:4] == CHALLENGE_MAGIC
    return data


def key_holder(dst: RegionDescriptor, key: bytes) -> Conn:
    """A connection that passed the handshake with ``key``: what a buggy (or compromised but
    keyed) worker could send reaches the checks behind it."""
    conn = connect(*address(dst), timeout=5.0, io_timeout=5.0)
    sender_handshake(conn, key, str(dst.address["receiver"]), 5.0, lambda: False)
    return conn


def tcp_data(tid: str, region: str, dst_offset: int, payload: bytes, checksum: bytes = b"",
             tag: bytes = b"") -> bytes:
    head = FRAME.pack(MAGIC, DATA, 0, 0, len(tid.encode()), len(region.encode()), dst_offset, 0, len(payload),
                      checksum, tag)
    return head + tid.encode() + region.encode() + payload


def tcp_end(tid: str, region: str, tag: bytes = b"", final: bool = True) -> bytes:
    head = FRAME.pack(MAGIC, END, 0, FLAG_FINAL if final else 0, len(tid.encode()), len(region.encode()), 0, 0, 0,
                      b"", tag)
    return head + tid.encode() + region.encode()


def pull_post(tid: str, region: str, pieces: list[list[object]], tag: str = "", final: bool = True) -> bytes:
    body = json.dumps({"op": "post", "tid": tid, "region": region, "pieces": pieces, "final": final, "tag": tag,
                       "source": {"segment": "hetpd-kv-1-0123456789abcdef", "length": 1 << 20}}).encode()
    return struct.pack("!I", len(body)) + body


def forged_post(backend: str, tid: str, region: str, tag: bytes = b"") -> bytes:
    """A post of 4 KiB of 0xAA for ``tid`` into ``region`` at offset 0, final."""
    if backend == "tcp":
        return tcp_data(tid, region, 0, b"\xaa" * 4096, tag=tag) + tcp_end(tid, region, tag)
    return pull_post(tid, region, [[0, 0, 4096, "00" * 8]], tag.hex())


class Impostor:
    """A listener that took a receiver's place: it sends a challenge with the real receiver's
    token but cannot prove it knows the key. ``after_hello`` is every byte it got after the
    sender's answer (there must be none)."""

    def __init__(self, token: str) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.after_hello = b""
        self.answered = False
        self._thread = threading.Thread(target=self._run, args=(token,), daemon=True)
        self._thread.start()

    def _run(self, token: str) -> None:
        self._server.settimeout(10)
        sock, _ = self._server.accept()
        with sock:
            sock.settimeout(10)
            sock.sendall(CHALLENGE.pack(CHALLENGE_MAGIC, bytes(32), token.encode()))
            hello = b""
            while len(hello) < HELLO.size:
                chunk = sock.recv(HELLO.size - len(hello))
                if not chunk:
                    return
                hello += chunk
            self.answered = True
            sock.sendall(WELCOME.pack(WELCOME_MAGIC, bytes(32)))  # a guess at the proof
            try:
                while chunk := sock.recv(65536):
                    self.after_hello += chunk
            except OSError:
                pass

    def join(self) -> None:
        self._thread.join(timeout=10)
        self._server.close()
