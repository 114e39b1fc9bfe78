"""In-process transport: sender and receiver objects in one process (tests, colocated P/D).

Real copies through the same checksum path as the other backends: the sender hashes each
piece of its source, the receiver copies it into its region in cache-sized chunks, hashing
what landed, under the transfer's write lock. ``post`` is synchronous: when it returns, the
post's bytes have landed (or the transfer has ended). The "peer" of a transfer is the sender
object, so several senders may feed one receiver, each told its own verdicts.

``key`` is accepted (so callers can pass the deployment key to any backend) and ignored:
nothing here crosses a process, so there is no stranger to keep out; checksums are xxh3.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from hetpd.transfer.base import FaultInjection, RegionDescriptor, Span, TransferResult
from hetpd.transfer.checksum import PIECE_BYTES, copy_and_digest
from hetpd.transfer.core import ReceiverCore, SenderCore
from hetpd.transfer.ledger import TransferRecord

BACKEND = "inproc"


class InprocReceiver(ReceiverCore):
    """Receiver whose senders live in the same process (see ``ReceiverCore`` for the rules)."""

    backend = BACKEND

    def __init__(self, verify: bool = True, key: bytes | None = None) -> None:
        super().__init__()  # the key is not used in-process (see the module docstring)
        self._verify = verify

    def _address(self) -> dict[str, str | int]:
        return {}

    def _tell_peer(self, peer: Hashable, result: TransferResult) -> None:
        if isinstance(peer, InprocSender):
            peer._verdict(result.transfer_id, result.status, result.nbytes, result.error)

    def _land(self, sender: InprocSender, transfer_id: str, region: str,
              checked: Iterator[tuple[Span, bytes, memoryview]], final: bool) -> None:
        """Called by ``sender.post``: copy each piece into the region, checking it."""
        record = self._bind(transfer_id, region, sender)
        if isinstance(record, str):
            self._tell_peer(sender, self._refusal(transfer_id, record))
            return
        for piece, checksum, payload in checked:
            # The lock is per piece, so a cancel waits for at most one piece's copy.
            with record.write_lock:
                if record.result is not None:
                    return  # ended (cancelled, failed): nothing more lands
                dst = self._dst_view(record, piece)
                if dst is None:
                    return
                got = copy_and_digest(dst, payload, self._hasher(record, piece))
                if not self._check_landed(record, piece, checksum, got):
                    return
        self._post_done(record, final)

    def _sender_cancelled(self, sender: InprocSender, transfer_id: str) -> None:
        self._peer_cancelled(transfer_id, sender)


class InprocSender(SenderCore):
    """Sender that copies straight into ``receiver`` (an :class:`InprocReceiver`)."""

    backend = BACKEND

    def __init__(self, receiver: InprocReceiver, fault: FaultInjection | None = None,
                 piece_bytes: int = PIECE_BYTES, verify: bool = True, key: bytes | None = None) -> None:
        if not isinstance(receiver, InprocReceiver):
            raise ValueError(f"receiver must be an InprocReceiver, got {type(receiver).__name__}")
        super().__init__(fault, piece_bytes, verify)  # the key is not used in-process
        self._receiver = receiver

    def _send_post(self, record: TransferRecord, src_region: str, dst: RegionDescriptor,
                   checked: Iterator[tuple[Span, bytes, memoryview]], final: bool) -> None:
        if dst.address.get("receiver") != self._receiver.token:
            self._fail(record, f"dst region {dst.region!r} belongs to another receiver than this "
                               f"sender's; make an InprocSender for that receiver")
            return
        self._receiver._land(self, record.transfer_id, dst.region, checked, final)

    def _send_cancel(self, record: TransferRecord) -> None:
        self._receiver._sender_cancelled(self, record.transfer_id)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return other is self
