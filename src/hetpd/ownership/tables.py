"""Per-worker lease tables: what a prefill worker (:class:`ProducerLeases`) or a decode worker
(:class:`ConsumerLeases`) owns. Sans-IO, pure Python.

A table routes each event to its lease by ``(lease_id, epoch)``, answers messages about leases
it does not know, expires overdue leases and sends keepalives at ``tick``, and forgets
finished leases ``retain`` seconds after they ended (never while pages are quarantined).

Messages about unknown leases (the peer restarted, or the lease was forgotten) never raise:

* an epoch below the newest one this table knows for the lease id is stale: ignored;
* a message that expects a live peer (reserved, heartbeat, transfer posted, committed) is
  answered with ``Abort(PEER_UNKNOWN)``, so the peer frees promptly instead of waiting a TTL;
* a failure notice for an unknown lease is never answered (no ping-pong); the consumer keeps
  it as a tombstone, so an offer that arrives after its own abort is not admitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

from hetpd.ownership.effects import (
    Admit,
    Effect,
    FreeBlocks,
    LeaseKey,
    Send,
    Step,
    Tick,
    TransferOutcome,
    applied,
    duplicate,
    ignored,
)
from hetpd.ownership.lease import ConsumerLease, LeaseConfig, ProducerLease, _Lease
from hetpd.ownership.messages import (
    Abort,
    Committed,
    Expired,
    FailureKind,
    Heartbeat,
    Message,
    Refused,
    ReleaseAck,
    Reserved,
    ReserveRequest,
    TransferPosted,
)

_L = TypeVar("_L", bound=_Lease)


class _Table(Generic[_L]):
    def __init__(self, config: LeaseConfig | None = None) -> None:
        self.config = config or LeaseConfig()
        self._leases: dict[LeaseKey, _L] = {}
        self._newest: dict[str, int] = {}  # lease id -> highest epoch seen
        self._epochs: dict[str, set[int]] = {}  # lease id -> epochs remembered (an index: no scans of every lease)
        self._transfers: dict[str, LeaseKey] = {}  # transfer id -> lease, while in flight

    # ------------------------------------------------------------------ queries
    def get(self, lease_id: str, epoch: int | None = None) -> _L | None:
        """The lease with this id (its newest attempt unless ``epoch`` is given), if remembered."""
        if epoch is None:
            epoch = self._newest.get(lease_id)
            if epoch is None:
                return None
        return self._leases.get(LeaseKey(lease_id, epoch))

    def __iter__(self) -> Iterator[_L]:
        return iter(list(self._leases.values()))

    def live(self) -> int:
        """Leases not yet in a terminal state."""
        return sum(1 for lease in self._leases.values() if lease.live)

    def holdings(self) -> Mapping[LeaseKey, tuple[int, ...]]:
        """Pages each lease owns right now (quarantined ones included); leases owning none are left out."""
        return MappingProxyType({key: lease.blocks for key, lease in self._leases.items() if lease.blocks})

    def in_flight(self) -> Mapping[str, LeaseKey]:
        """Transfer id -> lease, for every transfer end this side posted and has not seen settle."""
        return MappingProxyType(dict(self._transfers))

    # ------------------------------------------------------------------ events
    def abort(self, lease_id: str, now: float, detail: str = "aborted by the client") -> Step:
        """Client abort of the newest attempt of ``lease_id``."""
        lease = self.get(lease_id)
        if lease is None:
            return ignored(f"unknown lease {lease_id!r}")
        return self._track(lease, lease.abort(now, detail))

    def renew(self, lease_ids: Iterable[str], now: float) -> int:
        """The peer of these leases is known to be alive (a third party vouches for its process,
        e.g. its heartbeats reach the router while its engine is busy): renew their newest
        attempts as a message from the peer would. Ended or unknown leases are left alone.
        Returns how many were renewed."""
        renewed = 0
        for lease_id in lease_ids:
            lease = self.get(lease_id)
            if lease is not None and lease.live:
                lease.renew(now)
                renewed += 1
        return renewed

    def transfer_settled(self, transfer_id: str, outcome: TransferOutcome, now: float) -> Step:
        """The transport reports this side's end of ``transfer_id`` is over (completed, failed
        its checksum, or cancelled). Reporting twice, or an unknown id, is ignored."""
        key = self._transfers.pop(transfer_id, None)
        lease = None if key is None else self._leases.get(key)
        if lease is None:
            return ignored(f"no transfer {transfer_id!r} in flight on this side")
        return self._track(lease, lease.transfer_settled(outcome, now))

    def tick(self, now: float) -> Tick:
        """Expire overdue leases, send due keepalives, forget long-finished leases."""
        effects: list[Effect] = []
        expired: list[LeaseKey] = []
        for lease in list(self._leases.values()):
            lease_effects, did_expire = lease.tick(now)
            effects.extend(lease_effects)
            if did_expire:
                expired.append(lease.key)
            self._track(lease, None)
        return Tick(tuple(effects), tuple(expired), self._prune(now))

    # ------------------------------------------------------------------ helpers
    def _to_known_lease(self, message: Message, wrong_way: tuple[type, ...], direction: str, now: float) -> Step | None:
        """The step for a message this table can place (wrong direction, a known attempt, or a
        stale one); None when it is about an attempt this side has never seen."""
        if isinstance(message, wrong_way):
            return ignored(f"{message.TYPE} is not a {direction} message")
        key = LeaseKey(message.lease_id, message.epoch)
        lease = self._leases.get(key)
        if lease is not None:
            return self._track(lease, lease.receive(message, now))
        return self._stale(key)

    def _stale(self, key: LeaseKey) -> Step | None:
        """The step for a message from an attempt older than the newest one known, else None."""
        newest = self._newest.get(key.lease_id)
        if newest is not None and key.epoch < newest:
            return ignored(f"stale epoch {key.epoch} of {key.lease_id!r} (newest is {newest})")
        return None

    def attempts(self, lease_id: str) -> list[_L]:
        """Every remembered attempt of ``lease_id``, oldest first."""
        return [self._leases[LeaseKey(lease_id, e)] for e in sorted(self._epochs.get(lease_id, ()))]

    def _add(self, lease: _L) -> None:
        self._leases[lease.key] = lease
        self._epochs.setdefault(lease.key.lease_id, set()).add(lease.key.epoch)
        self._newest[lease.key.lease_id] = max(lease.key.epoch, self._newest.get(lease.key.lease_id, 0))

    def _track(self, lease: _L, step: Step | None) -> Step:
        """Keep the transfer index in step with the lease after every event."""
        if lease.in_flight:
            self._transfers[lease.transfer_id] = lease.key
        else:
            self._transfers.pop(lease.transfer_id, None)
        return step if step is not None else applied()

    def _prune(self, now: float) -> int:
        forget = [
            key
            for key, lease in self._leases.items()
            if lease.ended_at is not None
            and not lease.in_flight
            and not lease.blocks
            and now - lease.ended_at >= self.config.retain
            and now >= lease.deadline  # a committed consumer re-sends until then
        ]
        for key in forget:
            del self._leases[key]
            epochs = self._epochs[key.lease_id]
            epochs.discard(key.epoch)
            if not epochs:
                del self._epochs[key.lease_id]
                del self._newest[key.lease_id]
        return len(forget)


def _answer_unknown(message: Message) -> Step:
    """A message that expects a live lease we do not know: answer it, so the peer frees promptly
    instead of waiting a whole TTL."""
    notice = Abort(message.lease_id, message.epoch, FailureKind.PEER_UNKNOWN, "lease unknown here (restarted or forgotten)")
    return ignored(f"unknown lease {message.lease_id}@{message.epoch}", Send(notice))


class ProducerLeases(_Table[ProducerLease]):
    """The prefill worker's leases: one per request whose KV it computes for another worker."""

    def open(self, lease_id: str, request_id: str, num_blocks: int, num_bytes: int, now: float, epoch: int = 1,
             meta: str = "") -> Step:
        """Start an attempt (state COMPUTING) and offer it to the consumer (``meta`` rides along
        in the offer). Raises ValueError for a caller bug: an attempt that exists, or a new one
        while an older one is still live."""
        if epoch < 1:
            raise ValueError(f"epoch must be >= 1 (the attempt number), got {epoch}")
        if num_blocks < 0 or num_bytes < 0:
            raise ValueError(f"num_blocks and num_bytes must be >= 0, got {num_blocks}, {num_bytes}")
        key = LeaseKey(lease_id, epoch)
        if key in self._leases or self._newest.get(lease_id, 0) >= epoch:
            raise ValueError(f"attempt {key} exists already or is older than {lease_id!r}'s newest; use a higher epoch")
        older = self.get(lease_id)
        if older is not None and older.live:
            raise ValueError(f"attempt {older.key} is still live ({older.state.value}); abort it before retrying")
        lease = ProducerLease(key, request_id, num_blocks, num_bytes, self.config, now, meta)
        self._add(lease)
        return applied(Send(lease.offer))

    def hold(self, lease_id: str, block_ids: tuple[int, ...] | list[int], num_bytes: int, now: float) -> Step:
        """Prefill of the newest attempt is done: the lease takes the pages. If it ended already
        (or was forgotten: the effect's key then has epoch 0) the step says to free them instead."""
        blocks = tuple(block_ids)
        lease = self.get(lease_id)
        if lease is None:
            return ignored(f"unknown lease {lease_id!r}; the pages go back to the pool", FreeBlocks(LeaseKey(lease_id, 0), blocks, num_bytes, refused=True))
        return self._track(lease, lease.hold(blocks, num_bytes, now))

    def receive(self, message: Message, now: float) -> Step:
        """A message from a consumer."""
        known = self._to_known_lease(message, (ReserveRequest, TransferPosted, ReleaseAck), "consumer-to-producer",
                                     now)
        if known is not None:
            return known
        key = LeaseKey(message.lease_id, message.epoch)
        if isinstance(message, (Reserved, Heartbeat, Committed)):
            return _answer_unknown(message)
        return ignored(f"unknown lease {key}")  # a failure notice: never answered


class ConsumerLeases(_Table[ConsumerLease]):
    """The decode worker's leases: one per request whose KV it receives from another worker."""

    def receive(self, message: Message, now: float) -> Step:
        """A message from a producer. A new offer yields an :class:`Admit` effect: answer it with
        :meth:`reserve` or :meth:`refuse` (now, or later; a repeated offer meanwhile yields
        another ``Admit``, and the second ``reserve`` hands its pages straight back)."""
        known = self._to_known_lease(message, (Reserved, Refused, Committed), "producer-to-consumer", now)
        if known is not None:
            return known
        key = LeaseKey(message.lease_id, message.epoch)
        if isinstance(message, ReserveRequest):
            effects: list[Effect] = []
            for older in self.attempts(key.lease_id):
                if older.live:
                    effects.extend(self._track(older, older.supersede(now)).effects)
            return applied(*effects, Admit(message))
        if isinstance(message, (Abort, Expired)):
            # Aborted before we admitted it: remember, so the offer (if it comes late) is refused.
            failure = message.failure if isinstance(message, Abort) else FailureKind.EXPIRED
            self._add(ConsumerLease.ended(key, "", failure, f"peer: {message.detail}", self.config, now, None))
            return applied()
        if isinstance(message, (TransferPosted, Heartbeat)):
            return _answer_unknown(message)
        return ignored(f"unknown lease {key}")  # a release ack for a forgotten lease

    def reserve(self, offer: ReserveRequest, block_ids: tuple[int, ...] | list[int], num_bytes: int, now: float,
                meta: str = "") -> Step:
        """Admit an offer with pages the caller allocated (state RESERVED) and tell the producer
        (``meta`` rides along in the Reserved message).
        If the attempt is already known (reserved, ended, or superseded) the lease does not take
        the pages: the step says to free them."""
        blocks = tuple(block_ids)
        key = LeaseKey(offer.lease_id, offer.epoch)
        if key in self._leases or self._newest.get(key.lease_id, 0) > key.epoch:
            existing = self._leases.get(key)
            state = "superseded" if existing is None else existing.state.value
            return ignored(f"attempt {key} is already {state}; the pages go back to the pool", FreeBlocks(key, blocks, num_bytes, refused=True))
        lease, step = ConsumerLease.reserved(offer, blocks, num_bytes, self.config, now, meta)
        self._add(lease)
        return step

    def refuse(self, offer: ReserveRequest, reason: str, now: float) -> Step:
        """Decline an offer (pages or slots short); nothing is held. Tells the producer."""
        key = LeaseKey(offer.lease_id, offer.epoch)
        if key in self._leases:
            return duplicate(f"attempt {key} is already {self._leases[key].state.value}")
        notice = Refused(key.lease_id, key.epoch, reason)
        self._add(ConsumerLease.ended(key, offer.request_id, FailureKind.REFUSED, reason, self.config, now, notice))
        return applied(Send(notice))
