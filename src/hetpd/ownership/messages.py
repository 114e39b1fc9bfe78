"""Protocol messages between a KV producer (prefill side) and a KV consumer (decode side).

Pure data: frozen dataclasses that cross a process boundary as JSON (``to_dict`` /
:func:`message_from_dict`, a ``type`` tag names the class; pickle is never used).

Every message names one handoff attempt by ``lease_id`` and ``epoch``. The lease id is unique
per handoff (callers make it unique across worker incarnations, e.g. by including an
incarnation nonce); the epoch is the attempt number, 1 for the first attempt, so a message
from an earlier attempt is recognisably stale.

Direction (P = producer, C = consumer):

=================  =====  ==========================================================
message            dir    meaning
=================  =====  ==========================================================
ReserveRequest     P->C   please reserve pages for this handoff (re-sent until answered)
Reserved           C->P   pages reserved; the transfer may target ``block_ids``
Refused            C->P   no reservation (pages or slots short); nothing is held
TransferPosted     P->C   the producer posted its send; post the receive
Committed          C->P   all bytes arrived and verified; the consumer owns the KV now
ReleaseAck         P->C   the producer released its pages (stops Committed re-sends)
Abort              both   the sender ended this attempt (``failure`` says why)
Expired            both   the sender's lease ran out of time (peer silent for a TTL)
Heartbeat          both   still alive; renews the receiver's lease
=================  =====  ==========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, Union


class FailureKind(str, Enum):
    """Why a handoff attempt ended without success. Travels in :class:`Abort`."""

    CLIENT_ABORT = "client_abort"  # the client (or the caller) cancelled the request
    REFUSED = "refused"  # the consumer could not reserve pages or a sequence slot
    CHECKSUM = "checksum"  # the transport delivered bytes that failed verification
    TRANSFER_CANCELLED = "transfer_cancelled"  # the transport gave up on the transfer
    EXPIRED = "expired"  # a lease ran out of time: the peer was silent for a whole TTL
    PEER_UNKNOWN = "peer_unknown"  # the peer does not know this lease (it restarted)
    SUPERSEDED = "superseded"  # a newer attempt (higher epoch) of the same lease replaced it


_M = TypeVar("_M", bound="_Wire")


class _Wire:
    """JSON conversion shared by every message class (the ``type`` tag is ``TYPE``)."""

    TYPE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return message_to_dict(self)

    @classmethod
    def from_dict(cls: type[_M], raw: Mapping[str, Any]) -> _M:
        message = message_from_dict(raw)
        if not isinstance(message, cls):
            raise ValueError(f"expected a {cls.TYPE} message, got {message.TYPE}")
        return message


@dataclass(frozen=True)
class ReserveRequest(_Wire):
    TYPE: ClassVar[str] = "reserve_request"
    lease_id: str
    epoch: int
    request_id: str
    num_blocks: int  # in the producer's page size; the consumer sizes its own reservation
    num_bytes: int
    # What the consumer needs to admit the request (hetpd sends the KV manifest: format, token
    # range, token ids). Opaque to the lease machine, which never reads it.
    meta: str = ""


@dataclass(frozen=True)
class Reserved(_Wire):
    TYPE: ClassVar[str] = "reserved"
    lease_id: str
    epoch: int
    block_ids: tuple[int, ...]  # the consumer's pages, for transports that need the target
    meta: str = ""  # opaque to the lease machine (hetpd: the staging region's descriptor)


@dataclass(frozen=True)
class Refused(_Wire):
    TYPE: ClassVar[str] = "refused"
    lease_id: str
    epoch: int
    reason: str


@dataclass(frozen=True)
class TransferPosted(_Wire):
    TYPE: ClassVar[str] = "transfer_posted"
    lease_id: str
    epoch: int
    transfer_id: str


@dataclass(frozen=True)
class Committed(_Wire):
    TYPE: ClassVar[str] = "committed"
    lease_id: str
    epoch: int


@dataclass(frozen=True)
class ReleaseAck(_Wire):
    TYPE: ClassVar[str] = "release_ack"
    lease_id: str
    epoch: int


@dataclass(frozen=True)
class Abort(_Wire):
    TYPE: ClassVar[str] = "abort"
    lease_id: str
    epoch: int
    failure: FailureKind
    detail: str = ""


@dataclass(frozen=True)
class Expired(_Wire):
    TYPE: ClassVar[str] = "expired"
    lease_id: str
    epoch: int
    detail: str = ""


@dataclass(frozen=True)
class Heartbeat(_Wire):
    TYPE: ClassVar[str] = "heartbeat"
    lease_id: str
    epoch: int


Message = Union[ReserveRequest, Reserved, Refused, TransferPosted, Committed, ReleaseAck, Abort, Expired, Heartbeat]

_CLASSES: Mapping[str, type[Message]] = MappingProxyType(
    {
        cls.TYPE: cls
        for cls in (ReserveRequest, Reserved, Refused, TransferPosted, Committed, ReleaseAck, Abort, Expired, Heartbeat)
    }
)


def message_to_dict(message: _Wire) -> dict[str, Any]:
    """JSON-ready dict: ``{"type": tag, **fields}`` (tuples become lists, enums their value)."""
    out: dict[str, Any] = {"type": message.TYPE}
    assert dataclasses.is_dataclass(message)
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def message_from_dict(raw: Mapping[str, Any]) -> Message:
    """Inverse of :func:`message_to_dict`. Raises ValueError naming an unknown ``type`` tag, a
    missing or unknown field, or a field of the wrong type (a peer's bytes are never trusted)."""
    tag = raw.get("type")
    cls = _CLASSES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValueError(f"unknown message type {tag!r}; known types: {sorted(_CLASSES)}")
    tag = cls.TYPE
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names - {"type"}
    if unknown:
        raise ValueError(f"{tag} message has unknown fields {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{tag} message lacks field {f.name!r}")
            continue
        values[f.name] = _parse_field(tag, f.name, str(f.type), raw[f.name])
    return cls(**values)


def _parse_field(tag: str, name: str, annotation: str, value: Any) -> Any:
    def wrong(expected: str) -> ValueError:
        return ValueError(f"{tag}.{name} must be {expected}, got {value!r}")

    if annotation == "str":
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if annotation == "int":
        # bool is an int subclass in Python; a peer sending true for a count is a bug.
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong("an integer")
        if name == "epoch" and value < 1:
            raise wrong("an integer >= 1")
        if name != "epoch" and value < 0:
            raise wrong("an integer >= 0")
        return value
    if annotation == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise wrong("a list of non-negative integers")
        return tuple(value)
    if annotation == "FailureKind":
        try:
            return FailureKind(value)
        except ValueError:
            raise wrong(f"one of {[k.value for k in FailureKind]}") from None
    raise AssertionError(f"no parser for {annotation}")  # a new field type needs a case here
