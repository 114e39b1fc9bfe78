"""The worker <-> router control channel: length-prefixed JSON, authenticated with a shared secret.

Never pickle: every frame is a 4-byte big-endian length and a UTF-8 JSON object with an
``op``. On connect the router sends a random challenge; the worker answers with
HMAC-SHA256(secret, challenge) and the router drops it unless that matches, so the secret
itself never crosses the wire. Until then a connection may send one frame of at most
``HELLO_MAX`` bytes within ``HANDSHAKE_TIMEOUT_S``: a stranger costs the router a few KiB. The router side is asyncio; workers use the blocking
:class:`hetpd.transfer.net.Conn`.

Ops, worker -> router: ``hello`` (auth + registration), ``heartbeat`` (from a thread of its own,
so a long engine step does not silence it), ``output`` (tokens of a request), ``lease`` (a lease
message for another worker), ``lease_ended``, ``trace``, ``stats``, ``error``.
Router -> worker: ``challenge``, ``welcome`` (with the worker's epoch) / ``rejected``,
``prefill``, ``generate`` (colocated), ``expect`` (a decode worker learns a request's sampling
params), ``lease``, ``alive`` (the workers whose heartbeats the router hears: their leases
stay renewed), ``peer_gone`` (a worker incarnation left: drop what is tied to it), ``abort``,
``shutdown``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import struct
from typing import Any

_LEN = struct.Struct("!I")
MAX_FRAME = 64 << 20  # after authentication: a prompt's token ids fit many times over
HELLO_MAX = 64 << 10  # before it
HANDSHAKE_TIMEOUT_S = 5.0


class ControlError(ConnectionError):
    """The peer broke the protocol (bad frame, bad auth) or went away."""


def new_challenge() -> str:
    return secrets.token_hex(16)


def answer(secret: str, challenge: str) -> str:
    return hmac.new(secret.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def verify(secret: str, challenge: str, response: object) -> bool:
    return isinstance(response, str) and hmac.compare_digest(answer(secret, challenge), response)


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> dict[str, Any]:
    try:
        header = await reader.readexactly(_LEN.size)
        (length,) = _LEN.unpack(header)
        if length > max_frame:
            raise ControlError(f"control frame of {length} bytes exceeds {max_frame}")
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ControlError(f"peer closed the control connection ({exc})") from None
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise ControlError(f"control frame is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ControlError("control frame is not an object with an 'op'")
    return message


async def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(encode(message))
    await writer.drain()
