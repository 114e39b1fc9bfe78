"""Who may talk to a KV receiver: key checks, derived keys, the connection handshake. Pure Python.

With a key (the deployment's shared secret, the same for every worker; workers are trusted,
strangers are not) every connection to a receiver's listener starts with a mutual handshake,
before any other byte is read or any buffer allocated::

    receiver -> sender  CHALLENGE  magic, receiver nonce (32 B), receiver token (32 B)
    sender -> receiver  HELLO      magic, sender nonce (32 B), HMAC(key, "hello"  | both nonces | token)
    receiver -> sender  WELCOME    magic,                      HMAC(key, "welcome"| both nonces | token)

The receiver reads exactly one HELLO (68 bytes) within its handshake timeout and checks it
with ``hmac.compare_digest``; a wrong answer or a slow one closes the connection. The sender
checks that the token is the one in the descriptor it posts to and that the WELCOME proves the
receiver knows the key, so KV never goes to an impostor that took the port. Both nonces are
fresh per connection, so a recorded handshake cannot be replayed; the two labels differ, so a
receiver's answer cannot be reflected as a sender's.

Per transfer, ``transfer_key = HMAC(key, "hetpd-kv-transfer\\0" | receiver token | "\\0" |
transfer id)``; from it come the tags every data message carries (checked before the message
binds the transfer or lands a byte) and the key of the piece MACs (``checksum.piece_hasher``).
The key itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from hetpd.transfer.net import Conn, PeerGone

NONCE_BYTES = 32
TOKEN_BYTES = 32  # ReceiverCore.token: uuid4().hex, 32 ASCII characters
MAC_BYTES = 32  # HMAC-SHA256, untruncated, in the handshake
TAG_BYTES = 16  # per-message transfer tags (truncated HMAC-SHA256: 128 bits)
CHALLENGE = struct.Struct(f"!4s{NONCE_BYTES}s{TOKEN_BYTES}s")
HELLO = struct.Struct(f"!4s{NONCE_BYTES}s{MAC_BYTES}s")
WELCOME = struct.Struct(f"!4s{MAC_BYTES}s")
CHALLENGE_MAGIC, HELLO_MAGIC, WELCOME_MAGIC = b"HPKC", b"HPKH", b"HPKW"
HANDSHAKE_TIMEOUT_S = 5.0


class AuthFailed(PeerGone):
    """The handshake failed: wrong key, no key, an impostor, or a peer too slow to answer."""


def check_key(key: object) -> bytes | None:
    """The key as bytes, None for keyless mode; ValueError for anything else."""
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError(f"key must be non-empty bytes (the deployment's shared secret) or None for a "
                         f"single trusted process or host, got {type(key).__name__}")
    return bytes(key)


def check_timeout(timeout: float, what: str) -> float:
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def token_bytes(token: str) -> bytes:
    """A receiver token as it travels in a CHALLENGE; ValueError if it is not one."""
    raw = token.encode()
    if len(raw) != TOKEN_BYTES:
        raise ValueError(f"receiver token {token!r} is not {TOKEN_BYTES} characters: the descriptor does not "
                         f"come from a hetpd receiver's register_region")
    return raw


@dataclass(frozen=True, slots=True)
class TransferAuth:
    """What both sides derive for one transfer: the tags of its messages and its piece-MAC key."""

    post_tag: bytes  # data messages that do not end the transfer (tcp DATA / END, pull posts)
    final_tag: bytes  # the message that ends it: a different tag, so a post cannot pass for final
    piece_key: bytes  # 32-byte BLAKE3 key of the piece MACs

    @classmethod
    def derive(cls, key: bytes, receiver_token: str, transfer_id: str) -> TransferAuth:
        transfer_key = _mac(key, b"hetpd-kv-transfer\0", receiver_token.encode(), b"\0", transfer_id.encode())
        return cls(_mac(transfer_key, b"hetpd-kv-tag\0post")[:TAG_BYTES],
                   _mac(transfer_key, b"hetpd-kv-tag\0final")[:TAG_BYTES],
                   _mac(transfer_key, b"hetpd-kv-piece-mac"))

    def tag(self, final: bool) -> bytes:
        return self.final_tag if final else self.post_tag

    def tag_ok(self, tag: bytes, final: bool) -> bool:
        return hmac.compare_digest(self.tag(final), tag)


def _hello_mac(key: bytes, receiver_nonce: bytes, token: bytes, sender_nonce: bytes) -> bytes:
    return _mac(key, b"hetpd-kv-hello\0", receiver_nonce, token, sender_nonce)


def _welcome_mac(key: bytes, receiver_nonce: bytes, token: bytes, sender_nonce: bytes) -> bytes:
    return _mac(key, b"hetpd-kv-welcome\0", receiver_nonce, token, sender_nonce)


def receiver_handshake(conn: Conn, key: bytes, token: str, stopping: Callable[[], bool]) -> None:
    """Prove the peer knows ``key`` (and prove we do). The caller set ``conn.deadline``: only
    one fixed-size HELLO is read before it. Raises AuthFailed (the caller closes the
    connection) or PeerGone."""
    receiver_nonce, raw_token = secrets.token_bytes(NONCE_BYTES), token_bytes(token)
    conn.send([CHALLENGE.pack(CHALLENGE_MAGIC, receiver_nonce, raw_token)])
    magic, sender_nonce, mac = HELLO.unpack(conn.recv_bytes(HELLO.size, stopping))
    if magic != HELLO_MAGIC or not hmac.compare_digest(mac, _hello_mac(key, receiver_nonce, raw_token, sender_nonce)):
        raise AuthFailed("authentication failed: the peer's answer does not prove it knows the key")
    conn.send([WELCOME.pack(WELCOME_MAGIC, _welcome_mac(key, receiver_nonce, raw_token, sender_nonce))])
    conn.deadline = None


def sender_handshake(conn: Conn, key: bytes, token: str, timeout: float, stopping: Callable[[], bool]) -> None:
    """Answer the receiver's challenge and check its proof, all within ``timeout`` seconds.
    ``token`` is the receiver named in the descriptor. Raises AuthFailed saying why."""
    conn.deadline = time.monotonic() + timeout
    raw_token = token_bytes(token)
    try:
        magic, receiver_nonce, their_token = CHALLENGE.unpack(conn.recv_bytes(CHALLENGE.size, stopping))
    except PeerGone as exc:
        raise AuthFailed(f"authentication failed: no challenge from the receiver within {timeout:g} s ({exc}); "
                         f"a receiver without a key sends none") from exc
    if magic != CHALLENGE_MAGIC:
        raise AuthFailed("authentication failed: the listener did not send a hetpd challenge "
                         "(a receiver without a key, or not a hetpd receiver)")
    if not hmac.compare_digest(their_token, raw_token):
        raise AuthFailed(f"authentication failed: the listener is not receiver {token} named in the descriptor")
    sender_nonce = secrets.token_bytes(NONCE_BYTES)
    mac = _hello_mac(key, receiver_nonce, raw_token, sender_nonce)
    conn.send([HELLO.pack(HELLO_MAGIC, sender_nonce, mac)])
    try:
        magic, proof = WELCOME.unpack(conn.recv_bytes(WELCOME.size, stopping))
    except PeerGone as exc:
        raise AuthFailed(f"authentication failed: the receiver refused our answer ({exc}); "
                         f"it holds a different key") from exc
    if magic != WELCOME_MAGIC or not hmac.compare_digest(proof, _welcome_mac(key, receiver_nonce, raw_token,
                                                                             sender_nonce)):
        raise AuthFailed("authentication failed: the receiver could not prove it knows the key "
                         "(an impostor on its port, or a different key)")
    conn.deadline = None
