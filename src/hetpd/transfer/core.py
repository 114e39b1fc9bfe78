"""The backend-independent half of every sender and receiver. Pure Python.

:class:`ReceiverCore` keeps the regions, the ledger and the rules (expect before data, tags
checked before a message binds, one peer per transfer, bounds re-checked, checksum or MAC
verified under the transfer's write lock, a final post counts only after the expected bytes);
:class:`SenderCore` keeps source regions, validates posts, cuts spans into checksummed pieces
and turns the receiver's verdicts into results. A backend adds only how bytes and messages
move (``_send_*`` / ``_tell_peer``).

Both take the deployment key (``key``, None without one); with it, each transfer's tags and
piece-MAC key are derived once (``auth.TransferAuth``) and kept on its record.
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import uuid
from abc import abstractmethod
from collections.abc import Hashable, Iterator, Sequence

from hetpd.transfer.base import (
    ANY_TRANSFER,
    Buffer,
    FaultInjection,
    RegionDescriptor,
    Span,
    TransferReceiver,
    TransferResult,
    TransferSender,
    TransferStatus,
    check_name,
    check_spans,
    writable_view,
)
from hetpd.transfer.auth import TransferAuth, check_key, token_bytes
from hetpd.transfer.checksum import PIECE_BYTES, Hasher, digest, mismatch_message, piece_hasher, pieces
from hetpd.transfer.ledger import Ledger, TransferRecord

_RECEIVER_HINT = "call expect(transfer_id, region) first; each result is delivered once"
_SENDER_HINT = "post it first; each result is delivered once"


class ReceiverCore(TransferReceiver):
    """Regions + ledger + the write rules; subclasses move the bytes."""

    _verify = True  # subclasses set it from their ``verify`` option (False: benchmarks only)

    def __init__(self, key: bytes | None = None) -> None:
        self._key = check_key(key)
        self._regions: dict[str, memoryview] = {}
        self._regions_lock = threading.Lock()
        self._ledger = Ledger(on_end=self._on_end)
        self._closed = False
        # Names this receiver in its descriptors (and, with a key, in every derived transfer key).
        self.token = uuid.uuid4().hex

    @abstractmethod
    def _address(self) -> dict[str, str | int]:
        """What a sender needs to reach this receiver."""

    def address(self) -> dict[str, str | int]:
        """Where senders reach this receiver (for logs and operators; senders use descriptors)."""
        return self._address()

    @abstractmethod
    def _tell_peer(self, peer: Hashable, result: TransferResult) -> None:
        """Send the verdict on a transfer to the sender it is bound to (best effort)."""

    # ------------------------------------------------------------------ public API
    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        check_name(name, "region name")
        view = writable_view(buffer, f"region {name!r}")
        with self._regions_lock:
            if name in self._regions:
                raise ValueError(f"region {name!r} is already registered; unregister it or pick another name")
            self._regions[name] = view
        return RegionDescriptor(self.backend, name, len(view), {"receiver": self.token, **self._address()})

    def unregister_region(self, name: str) -> None:
        with self._regions_lock:
            if name not in self._regions:
                raise ValueError(f"unknown region {name!r}; registered: {sorted(self._regions)}")
            live = [r.transfer_id for r in self._ledger.records() if r.region == name and r.result is None]
            if live:
                raise ValueError(f"region {name!r} has live transfers {live}; wait for or cancel them first")
            del self._regions[name]

    def expect(self, transfer_id: str, region: str, nbytes: int | None = None) -> None:
        check_name(transfer_id, "transfer_id")
        with self._regions_lock:
            view = self._regions.get(region)
            if view is None:
                raise ValueError(f"unknown region {region!r}; register_region it first "
                                 f"(registered: {sorted(self._regions)})")
        if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool)
                                   or not 0 <= nbytes <= len(view)):
            raise ValueError(f"nbytes must be None or an int in [0, {len(view)}] (region {region!r}'s length), "
                             f"got {nbytes!r}")
        auth = TransferAuth.derive(self._key, self.token, transfer_id) if self._key is not None else None
        self._ledger.add(transfer_id, region, auth, nbytes)

    def wait(self, transfer_id: str, timeout: float) -> TransferResult:
        return self._ledger.wait(transfer_id, timeout, _RECEIVER_HINT)

    def poll(self) -> list[TransferResult]:
        return self._ledger.poll()

    def cancel(self, transfer_id: str) -> TransferResult:
        result, _ = self._ledger.cancel(transfer_id, _RECEIVER_HINT)
        return result

    def close(self) -> None:
        self._closed = True
        self._ledger.end_where(lambda r: True, TransferStatus.FAILED, "receiver closed")

    # ------------------------------------------------------------------ for the data path
    def _tag_ok(self, transfer_id: str, tag: bytes, final: bool) -> bool:
        """Whether a data message for ``transfer_id`` carries the right tag (always, without a
        key). Checked before ``_bind``: a bad tag binds nothing, and the caller drops the
        connection it came on. Ids not (or no longer) expected are checked too, so a refusal
        is only ever sent to a peer that knows the key."""
        if self._key is None:
            return True
        record = self._ledger.get(transfer_id)
        auth = record.auth if record is not None else None
        if auth is None:
            auth = TransferAuth.derive(self._key, self.token, transfer_id)
        return auth.tag_ok(tag, final)

    def _bind(self, transfer_id: str, region: str, peer: Hashable) -> TransferRecord | str:
        """The live record that ``peer`` may write into ``region``, or why not (then the caller
        drops the data and reports the reason to the peer). The first peer to name a live
        transfer binds it: with a key, only a peer that passed the handshake and carries the
        transfer's tag (``_tag_ok``) gets here."""
        record = self._ledger.get(transfer_id)
        recent = self._ledger.recent(transfer_id) if record is None else None
        if recent is not None:
            return f"transfer {transfer_id!r} already ended on the receiver ({recent.status.value})"
        if record is None or record.result is not None:
            return (f"receiver does not expect transfer {transfer_id!r} (never expected, or already "
                    f"ended); the receiver calls expect() before the sender posts")
        if record.region != region:
            return (f"transfer {transfer_id!r} is expected into region {record.region!r}, "
                    f"not {region!r}")
        with record.write_lock:
            if record.peer is None:
                record.peer = peer
        if record.peer != peer:
            return f"transfer {transfer_id!r} is already bound to another sender"
        return record

    def _refusal(self, transfer_id: str, reason: str) -> TransferResult:
        """What to tell a sender whose data was refused: CANCELLED if the receiver cancelled it."""
        recent = self._ledger.recent(transfer_id)
        cancelled = recent is not None and recent.status is TransferStatus.CANCELLED
        return TransferResult(transfer_id, TransferStatus.CANCELLED if cancelled else TransferStatus.FAILED,
                              0, reason)

    def _dst_view(self, record: TransferRecord, piece: Span) -> memoryview | None:
        """The destination bytes of ``piece``, or None (and the transfer FAILED) if out of
        bounds. Caller holds ``record.write_lock``."""
        with self._regions_lock:
            region = self._regions.get(record.region)
        if region is None or piece.dst_offset < 0 or piece.dst_offset + piece.length > len(region):
            size = "unregistered" if region is None else f"{len(region)} bytes"
            self._ledger.end_locked(record, TransferStatus.FAILED,
                                    f"transfer {record.transfer_id!r}: span dst_offset={piece.dst_offset} "
                                    f"length={piece.length} outside region {record.region!r} ({size})")
            return None
        return region[piece.dst_offset : piece.dst_offset + piece.length]

    def _hasher(self, record: TransferRecord, piece: Span) -> Hasher | None:
        """What hashes ``piece`` as it lands (None when not verifying)."""
        if not self._verify:
            return None
        return piece_hasher(piece, record.auth.piece_key if record.auth is not None else None)

    def _check_landed(self, record: TransferRecord, piece: Span, expected: bytes, got: bytes) -> bool:
        """Account a piece that landed; a checksum (MAC) mismatch ends the transfer FAILED.
        Caller holds ``record.write_lock``. Both are b"" when not verifying."""
        if not hmac.compare_digest(expected, got):
            self._ledger.end_locked(record, TransferStatus.FAILED,
                                    mismatch_message(record.transfer_id, piece, expected, got, record.auth is not None))
            return False
        record.nbytes += piece.length
        return True

    def _post_done(self, record: TransferRecord, final: bool) -> None:
        """A post was handled; a final one ends the transfer: OK if the bytes ``expect`` asked
        for landed (a final post after none or some of them is FAILED, never a short OK)."""
        if final:
            with record.write_lock:
                record.final_posted = True
                expected = record.expected_nbytes
                if expected is not None and record.nbytes != expected:
                    self._ledger.end_locked(record, TransferStatus.FAILED,
                                            f"transfer {record.transfer_id!r}: final post after {record.nbytes} of "
                                            f"{expected} expected bytes; the sender must post every byte before final")
                else:
                    self._ledger.end_locked(record, TransferStatus.OK)

    def _peer_cancelled(self, transfer_id: str, peer: Hashable) -> None:
        record = self._ledger.get(transfer_id)
        if record is not None and record.peer == peer:
            self._ledger.end(record, TransferStatus.CANCELLED, f"transfer {transfer_id!r} cancelled by the sender")

    def _peer_lost(self, peer: Hashable, why: str) -> None:
        self._ledger.end_where(lambda r: r.peer == peer, TransferStatus.FAILED, why)

    def _on_end(self, record: TransferRecord) -> None:
        if record.peer is not None and record.result is not None:
            self._tell_peer(record.peer, record.result)


class SenderCore(TransferSender):
    """Source regions, post validation, checksummed pieces, verdicts -> results."""

    # Pull backends expose the source and flip a byte in place for a FaultInjection; push
    # backends send a corrupted copy of the piece instead.
    _pull = False

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = PIECE_BYTES,
                 verify: bool = True, key: bytes | None = None) -> None:
        if piece_bytes <= 0:
            raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
        self._key = check_key(key)
        self._verify = verify  # False only for benchmarks; the receiver must agree
        self._sources: dict[str, memoryview] = {}
        self._ledger = Ledger()
        self._fault = fault
        self._piece_bytes = piece_bytes
        self._closed = False

    @abstractmethod
    def _send_post(self, record: TransferRecord, src_region: str, dst: RegionDescriptor,
                   checked: Iterator[tuple[Span, bytes, memoryview]], final: bool) -> None:
        """Move the pieces (each with its checksum or MAC, and payload view), then mark the
        post's end. ``record.auth`` has the transfer's tags when there is a key."""

    @abstractmethod
    def _send_cancel(self, record: TransferRecord) -> None:
        """Tell the receiver the transfer is cancelled (best effort)."""

    def _peer_key(self, dst: RegionDescriptor) -> Hashable:
        return str(dst.address.get("receiver", ""))

    def _prepare(self, src_region: str, spans: tuple[Span, ...]) -> None:
        """Hook run once a post was validated, before anything is hashed or sent."""

    # ------------------------------------------------------------------ public API
    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        check_name(name, "region name")
        if name in self._sources:
            raise ValueError(f"source region {name!r} is already registered; pick another name")
        view = writable_view(buffer, f"source region {name!r}")
        self._sources[name] = view
        return RegionDescriptor(self.backend, name, len(view), {})

    def unregister_region(self, name: str) -> None:
        if name not in self._sources:
            raise ValueError(f"unknown source region {name!r}; registered: {sorted(self._sources)}")
        live = [r.transfer_id for r in self._ledger.records() if r.source == name and r.result is None]
        if live:
            raise ValueError(f"source region {name!r} has live transfers {live}; wait for or cancel them first")
        self._release_source(name)
        del self._sources[name]

    def _release_source(self, name: str) -> None:
        """Hook: stop exposing source region ``name`` (pull backends)."""

    def post(self, transfer_id: str, src_region: str, dst: RegionDescriptor, spans: Sequence[Span], *,
             final: bool) -> None:
        check_name(transfer_id, "transfer_id")
        if self._closed:
            raise ValueError("sender is closed; make a new one")
        if dst.backend != self.backend:
            raise ValueError(f"dst is a {dst.backend!r} region but this is a {self.backend!r} sender; "
                             f"use make_sender({dst.backend!r}, ...)")
        source = self._sources.get(src_region)
        if source is None:
            raise ValueError(f"unknown src_region {src_region!r}; register_region it first "
                             f"(registered: {sorted(self._sources)})")
        spans = tuple(spans)
        check_spans(spans, len(source), dst.length, src_region, dst.region)
        record = self._ledger.get(transfer_id)
        if record is not None and record.final_posted:
            raise ValueError(f"transfer_id {transfer_id!r} already had its final post; wait for its result")
        if record is not None and (record.region, record.source) != (dst.region, src_region):
            raise ValueError(f"transfer_id {transfer_id!r} goes from {record.source!r} to region {record.region!r}; "
                             f"one transfer has one source and one destination region")
        if record is None:
            auth = None
            if self._key is not None:
                receiver = str(dst.address.get("receiver", ""))
                token_bytes(receiver)  # ValueError unless the descriptor names a receiver
                auth = TransferAuth.derive(self._key, receiver, transfer_id)
            record = self._ledger.add(transfer_id, dst.region, auth)
            record.peer = self._peer_key(dst)
            record.source = src_region
        self._prepare(src_region, spans)
        record.final_posted = final
        if record.result is not None:
            return  # the receiver already ended it (verdict waiting in wait/poll): send nothing more
        self._send_post(record, src_region, dst, self._checked(record, source, spans), final)

    def wait(self, transfer_id: str, timeout: float) -> TransferResult:
        return self._ledger.wait(transfer_id, timeout, _SENDER_HINT)

    def poll(self) -> list[TransferResult]:
        return self._ledger.poll()

    def cancel(self, transfer_id: str) -> TransferResult:
        record = self._ledger.require(transfer_id, _SENDER_HINT)
        result, cancelled = self._ledger.cancel(transfer_id, _SENDER_HINT)
        if cancelled:
            self._send_cancel(record)
        return result

    def close(self) -> None:
        self._closed = True
        self._ledger.end_where(lambda r: True, TransferStatus.FAILED, "sender closed")

    # ------------------------------------------------------------------ helpers
    def _checked(self, record: TransferRecord, source: memoryview, spans: tuple[Span, ...]
                 ) -> Iterator[tuple[Span, bytes, memoryview]]:
        """Pieces of ``spans`` with their checksums (MACs, with a key), hashed one piece ahead
        of the send."""
        if self._fault is not None and self._fault.transfer_id == ANY_TRANSFER:
            self._fault = dataclasses.replace(self._fault, transfer_id=record.transfer_id)  # the first one posted
        fault = self._fault if self._fault is not None and self._fault.transfer_id == record.transfer_id else None
        mac_key = record.auth.piece_key if record.auth is not None else None
        for piece in pieces(spans, self._piece_bytes):
            payload = source[piece.src_offset : piece.src_offset + piece.length]
            checksum = digest(piece, payload, mac_key) if self._verify else b""
            if fault is not None and piece.src_offset <= fault.src_offset < piece.src_offset + piece.length:
                at = fault.src_offset - piece.src_offset
                if self._pull:
                    payload[at] ^= 0xFF
                else:
                    corrupted = bytearray(payload)
                    corrupted[at] ^= 0xFF
                    payload = memoryview(corrupted)
            yield piece, checksum, payload

    def _verdict(self, transfer_id: str, status: TransferStatus, nbytes: int, error: str | None) -> None:
        """The receiver's result for a transfer arrived."""
        record = self._ledger.get(transfer_id)
        if record is None:
            return  # already delivered here (e.g. cancelled locally); nothing to update
        with record.write_lock:
            if record.result is None:
                record.nbytes = nbytes
                self._ledger.end_locked(record, status, error)

    def _fail(self, record: TransferRecord, why: str) -> None:
        self._ledger.end(record, TransferStatus.FAILED, why)

    def _peer_lost(self, peer: Hashable, why: str) -> None:
        self._ledger.end_where(lambda r: r.peer == peer, TransferStatus.FAILED, why)
