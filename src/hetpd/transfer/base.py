"""The KV byte transport interface: one narrow API, split by side. Pure Python, no torch.

Transfer engines move bytes, not tensors (what the bytes mean is ``hetpd.kv``'s job). A
*receiver* owns destination memory (where a request's KV lands, e.g. pages of the decode
side's pool); a *sender* owns source memory (the prefill side's exported KV). The receiver
hands the sender a :class:`RegionDescriptor` over some control channel (not this package's
business); the sender then posts spans of a transfer, in one or several posts (layer by layer
while later layers are still being computed), the last one marked ``final``.

Rules every backend follows (tested for each in ``tests/transfer``):

* **The receiver's own process writes every byte into its registered memory.** Pull backends
  (shm, nixl) copy from the sender's exposed memory; push backends (tcp) receive the payload
  straight into the region. Hence, once :meth:`TransferReceiver.cancel` returns, or a result
  for a transfer was delivered, no further byte of that transfer lands in the region. This
  is what lets the ownership layer free or reuse pages safely.
* **Integrity**: every piece of payload carries an integrity value taken by the sender; the
  receiver hashes what landed and a mismatch makes the transfer FAILED with a message naming
  the transfer and the span and containing "checksum". A transfer is never reported OK with
  unverified bytes, nor after a final post that came before the bytes ``expect`` asked for.
* **Two modes**, chosen by the ``key`` every network sender and receiver takes:

  - *with a key* (the deployment's shared secret; ``hetpd serve`` always passes one): every
    connection to a receiver starts with a mutual HMAC-SHA256 handshake (``auth``), so
    neither side talks to a stranger or an impostor; every data message carries a tag
    derived from the key, the receiver's token and the transfer id, checked before the
    message may bind the transfer or land a byte (a bad tag drops the connection and never
    touches the transfer); each piece's integrity value is a keyed BLAKE3 MAC over its
    destination offset, length and payload. A stranger can neither bind, inject, nor fail a
    transfer;
  - *without a key*: xxh3-64 checksums and no handshake: any process that reaches the port
    and names a live transfer id can bind it. Only for a single trusted process or host
    (tests, benchmarks). ``inproc`` accepts a key and ignores it: nothing crosses a process.
* **Bounded resources per peer** (keyed or not): a listener reads only a small, bounded first
  frame before a peer proved itself (the handshake, or without a key a valid first frame),
  closes a connection that has not within the handshake timeout (5 s by default), allocates
  per-connection buffers only afterwards, and holds at most ``max_conns_per_peer`` (8) live
  connections per peer IP address and ``max_conns`` (64) in all; the rest are closed at
  accept. A connection's thread ends when it closes.
* **No hangs**: a dead peer fails in-flight transfers promptly; ``wait`` always honours its
  timeout and returns TIMED_OUT rather than blocking.
* **Bad input** (span out of bounds, unknown transfer id or region) raises ``ValueError``
  naming the field and the fix, and changes nothing.
* A result is delivered once, by :meth:`wait`, :meth:`poll` or :meth:`cancel`; the transfer id
  is then forgotten (state stays bounded), and a late byte for it is dropped, never written.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

# What a caller may register: a bytearray, a writable memoryview, an mmap, a numpy array...
Buffer = bytearray | memoryview | Any


class TransferStatus(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Only ever returned by ``wait`` when its timeout ran out; the transfer is still live
    # (wait again, or cancel it). Every other status is final.
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class Span:
    """``length`` bytes from ``src_offset`` of the sender's region to ``dst_offset`` of the
    receiver's region."""

    src_offset: int
    dst_offset: int
    length: int


@dataclass(frozen=True)
class TransferResult:
    """Outcome of one transfer. ``nbytes``: payload bytes verified and written so far.
    ``error`` is None exactly when ``status`` is OK."""

    transfer_id: str
    status: TransferStatus
    nbytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is TransferStatus.OK


@dataclass(frozen=True)
class RegionDescriptor:
    """What one side tells the other about a registered region: JSON-serialisable.

    ``address`` holds whatever the peer needs to reach it: ``{"host", "port"}`` of a
    receiver's listener, ``{"segment"}`` of a sender's shared-memory segment, NIXL agent
    metadata... Only strings and integers, so ``to_dict`` round-trips through JSON.
    """

    backend: str
    region: str
    length: int
    address: dict[str, str | int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "region": self.region, "length": self.length,
                "address": dict(self.address)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RegionDescriptor:
        known = {"backend", "region", "length", "address"}
        if set(raw) != known:
            raise ValueError(f"RegionDescriptor dict must have exactly the keys {sorted(known)}, got {sorted(raw)}")
        if not isinstance(raw["backend"], str) or not isinstance(raw["region"], str):
            raise ValueError("RegionDescriptor 'backend' and 'region' must be strings")
        if not isinstance(raw["length"], int) or raw["length"] < 0:
            raise ValueError(f"RegionDescriptor 'length' must be an int >= 0, got {raw['length']!r}")
        address = raw["address"]
        if not isinstance(address, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) for k, v in address.items()
        ):
            raise ValueError("RegionDescriptor 'address' must map strings to strings or ints")
        return cls(raw["backend"], raw["region"], raw["length"], dict(address))


@dataclass(frozen=True)
class FaultInjection:
    """Test-only: flip one byte of transfer ``transfer_id`` after its checksum was taken.

    ``src_offset`` is an offset in the sender's source region that one of the transfer's spans
    covers. Push backends send a corrupted copy of that piece (the source is untouched); pull
    backends flip the byte in the exposed source memory before telling the receiver. Exists
    so tests exercise the real checksum path end to end without mocking a backend.
    ``transfer_id`` ``"*"`` (:data:`ANY_TRANSFER`) picks the first transfer the sender posts:
    a served deployment's ids are random.
    """

    transfer_id: str
    src_offset: int


ANY_TRANSFER = "*"


def writable_view(buffer: Buffer, what: str) -> memoryview:
    """A flat, writable, byte-addressed view of ``buffer``, or ValueError saying why not."""
    try:
        view = memoryview(buffer)
    except TypeError as exc:
        raise ValueError(f"{what} must support the buffer protocol (bytearray, memoryview, mmap, "
                         f"numpy array), got {type(buffer).__name__}") from exc
    if view.readonly:
        raise ValueError(f"{what} must be writable (use a bytearray, not bytes)")
    if not view.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_spans(spans: Sequence[Span], src_length: int, dst_length: int, src_name: str, dst_name: str) -> None:
    """Raise ValueError naming the first span that does not fit; change nothing."""
    for index, span in enumerate(spans):
        if not isinstance(span, Span):
            raise ValueError(f"spans[{index}] must be a Span, got {type(span).__name__}")
        if span.length <= 0:
            raise ValueError(f"spans[{index}].length must be > 0, got {span.length}; drop empty spans")
        if span.src_offset < 0 or span.src_offset + span.length > src_length:
            raise ValueError(
                f"spans[{index}] src_offset={span.src_offset} length={span.length} is outside source "
                f"region {src_name!r} of {src_length} bytes; keep src_offset + length <= {src_length}")
        if span.dst_offset < 0 or span.dst_offset + span.length > dst_length:
            raise ValueError(
                f"spans[{index}] dst_offset={span.dst_offset} length={span.length} is outside destination "
                f"region {dst_name!r} of {dst_length} bytes; keep dst_offset + length <= {dst_length}")


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or len(name.encode()) > 1024:
        raise ValueError(f"{what} must be a non-empty string of at most 1024 UTF-8 bytes, got {name!r}")


class _Closable(ABC):
    @abstractmethod
    def close(self) -> None:
        """Release sockets, threads and memory; in-flight transfers end FAILED. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class TransferReceiver(_Closable):
    """Owns destination regions; the bytes of a transfer land there, written by this process.

    **Guarantee**: this process performs every write into its registered memory. Once
    :meth:`cancel` returns for a transfer, or its result was delivered by :meth:`wait` or
    :meth:`poll`, no further byte of that transfer lands in any registered region: late data
    is drained and dropped. Bytes are never reported OK unless their checksum matched.

    Protocol: ``register_region`` -> hand the descriptor to the sender -> ``expect(tid, region,
    nbytes)`` before the sender posts (data for a transfer not expected is refused, never
    written) -> ``wait``/``poll`` -> the result (OK, FAILED, CANCELLED), delivered once.
    """

    backend: str

    @abstractmethod
    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        """Register writable memory under ``name``; the descriptor is what the sender needs."""

    @abstractmethod
    def unregister_region(self, name: str) -> None:
        """Forget a region; ValueError if unknown or if a live transfer targets it."""

    @abstractmethod
    def expect(self, transfer_id: str, region: str, nbytes: int | None = None) -> None:
        """Accept transfer ``transfer_id`` into ``region``; ValueError if the region is unknown,
        the id is already live, or ``nbytes`` is not None nor an int in ``[0, region length]``.

        ``nbytes``: how many verified payload bytes must have landed when the final post
        arrives; a final post after fewer (none, e.g. an empty final post) or more ends the
        transfer FAILED ("final post after X of N expected bytes"), never OK. None: not
        checked (callers that cannot know the size; any final post then completes it)."""

    @abstractmethod
    def wait(self, transfer_id: str, timeout: float) -> TransferResult:
        """Block until the transfer ends (its result, delivered once) or ``timeout`` seconds pass
        (TIMED_OUT, transfer still live). ValueError for an id not expected / already delivered."""

    @abstractmethod
    def poll(self) -> list[TransferResult]:
        """Results of transfers that ended since the last call; never blocks."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> TransferResult:
        """Stop transfer ``transfer_id``: when this returns no further byte of it lands. Returns
        its final result: CANCELLED, or the earlier outcome if it had already ended."""


class TransferSender(_Closable):
    """Owns source regions and posts spans of them to a receiver's region.

    ``post`` may be called several times per transfer (streaming); the last call says
    ``final=True``. Connection trouble never raises from ``post``: the transfer ends FAILED and
    ``wait`` says why. After ``wait`` returned a final result, the receiver reads no more of the
    transfer's source bytes (pull backends), so the caller may reuse them.
    """

    backend: str

    @abstractmethod
    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        """Register source memory under ``name``."""

    @abstractmethod
    def unregister_region(self, name: str) -> None:
        """Forget a source region (and release what exposes it to receivers); ValueError if
        unknown or if a transfer posted from it has not ended."""

    def allocate_region(self, name: str, length: int) -> memoryview:
        """A new zero-filled source region of ``length`` bytes, registered under ``name``.

        Backends that expose source memory to the peer (shm) allocate it where the peer can
        read it, so a producer writing here saves a staging copy at post time."""
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        buffer = bytearray(length)
        self.register_region(name, buffer)
        return memoryview(buffer)

    @abstractmethod
    def post(self, transfer_id: str, src_region: str, dst: RegionDescriptor, spans: Sequence[Span], *,
             final: bool) -> None:
        """Send ``spans`` of source region ``src_region`` into the receiver's region ``dst``."""

    @abstractmethod
    def wait(self, transfer_id: str, timeout: float) -> TransferResult:
        """The receiver's verdict on the transfer (delivered once), FAILED if the peer is gone,
        TIMED_OUT (still live) when ``timeout`` runs out."""

    @abstractmethod
    def poll(self) -> list[TransferResult]:
        """Verdicts that arrived since the last call; never blocks."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> TransferResult:
        """Stop posting ``transfer_id`` and tell the receiver to drop it; returns CANCELLED (or
        the verdict, if one had already arrived)."""
