"""Lease state machines for one KV handoff attempt, one object per side. Sans-IO, pure Python.

A :class:`ProducerLease` lives on the prefill worker, a :class:`ConsumerLease` on the decode
worker; the tables in :mod:`hetpd.ownership.tables` route events to them. Every method takes
``now`` (seconds, any monotonic origin: a worker's clock or a simulator's) and returns a
:class:`~hetpd.ownership.effects.Step`; nothing here raises on a message, however late,
duplicated or stale.

Invariants (asserted by the stateful tests in ``tests/ownership``):

* A lease owns ``blocks`` from its ``HoldBlocks`` effect until exactly one ``FreeBlocks`` or
  ``AdoptBlocks`` effect gives them away; ``blocks`` is empty afterwards, so nothing is freed twice.
* Pages are never given away while this side's end of a transfer may touch them: a lease that
  ends with a transfer in flight emits ``CancelTransfer`` (on failure) and keeps the pages
  *quarantined* until the transport reports the transfer settled.
* The consumer reserves before any bytes move (the producer posts its send only after
  ``Reserved``); the producer gives its pages away only after ``Committed`` (or a failure).
* ``deadline = last renewal + ttl``; any message from the peer about a live lease renews it.
  A lease past its deadline at ``tick`` expires, tells the peer, and frees (once settled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hetpd.ownership.effects import (
    AdoptBlocks,
    CancelTransfer,
    Effect,
    Ended,
    FreeBlocks,
    HoldBlocks,
    LeaseKey,
    LeaseState,
    Send,
    Side,
    StartTransfer,
    Step,
    TransferOutcome,
    applied,
    duplicate,
    ignored,
    state_for,
)
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


@dataclass(frozen=True)
class LeaseConfig:
    """Timing of one side's leases (seconds).

    ``ttl``: a lease whose peer stays silent this long expires. ``heartbeat_interval``: how
    often ``tick`` sends a keepalive (must be well below the *peer's* ttl). ``retain``: how long
    a finished lease is remembered so late messages about it get a precise answer.
    """

    ttl: float = 10.0
    heartbeat_interval: float = 2.0
    retain: float = 60.0

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError(f"LeaseConfig.ttl must be > 0 seconds, got {self.ttl}")
        if not 0 < self.heartbeat_interval < self.ttl:
            raise ValueError(
                f"LeaseConfig.heartbeat_interval must be > 0 and below ttl={self.ttl} "
                f"(e.g. ttl / 3, so one lost heartbeat does not expire the lease), got {self.heartbeat_interval}"
            )
        if not self.retain >= 0:
            raise ValueError(f"LeaseConfig.retain must be >= 0 seconds, got {self.retain}")


def notice_for(key: LeaseKey, failure: FailureKind, detail: str) -> Message:
    """The message that tells the peer this attempt ended in ``failure``."""
    if failure is FailureKind.EXPIRED:
        return Expired(key.lease_id, key.epoch, detail)
    return Abort(key.lease_id, key.epoch, failure, detail)


class _Lease:
    """What both sides share: ownership of ``blocks``, the deadline, quarantine, ending."""

    side: ClassVar[Side]

    def __init__(self, key: LeaseKey, request_id: str, state: LeaseState, config: LeaseConfig, now: float) -> None:
        self.key = key
        self.request_id = request_id
        self.state = state
        self.config = config
        self.blocks: tuple[int, ...] = ()  # pages this lease owns right now (quarantined ones too)
        self.num_bytes = 0
        self.in_flight = False  # this side's end of the transfer is posted and not yet settled
        self.deadline = now + config.ttl
        self.last_sent = now
        self.ended_at: float | None = None
        self.failure: FailureKind | None = None
        self.detail = ""
        self.notice: Message | None = None  # re-sent to a peer that still talks about a failed lease

    @property
    def transfer_id(self) -> str:
        return str(self.key)

    @property
    def live(self) -> bool:
        return not self.state.terminal

    @property
    def quarantined(self) -> bool:
        """Ended, but its pages wait for this side's transfer to settle before they are freed."""
        return self.state.terminal and self.in_flight

    def receive(self, message: Message, now: float) -> Step:
        """A message from the peer about this attempt (each side implements its half)."""
        raise NotImplementedError

    def renew(self, now: float) -> None:
        self.deadline = max(self.deadline, now + self.config.ttl)

    # ------------------------------------------------------------------ ending
    def _hold(self, block_ids: tuple[int, ...], num_bytes: int) -> HoldBlocks:
        self.blocks, self.num_bytes = block_ids, num_bytes
        return HoldBlocks(self.key, block_ids, num_bytes)

    def _free(self) -> list[Effect]:
        if not self.blocks:
            return []
        effect = FreeBlocks(self.key, self.blocks, self.num_bytes)
        self.blocks = ()
        return [effect]

    def _end(
        self, state: LeaseState, now: float, failure: FailureKind | None, detail: str, *, tell: bool
    ) -> list[Effect]:
        """Enter terminal ``state``. A failure cancels an in-flight transfer and quarantines the
        pages; success (RELEASED) just waits for the transfer to settle. ``tell``: notify the peer."""
        self.state, self.ended_at, self.failure, self.detail = state, now, failure, detail
        effects: list[Effect] = []
        if self.in_flight:
            if failure is not None:
                effects.append(CancelTransfer(self.transfer_id, self.key))
        else:
            effects.extend(self._free())
        if failure is not None and tell:
            self.notice = notice_for(self.key, failure, detail)
            effects.append(Send(self.notice))
        effects.append(Ended(self.key, self.side, state, failure, detail, self.request_id))
        return effects

    def _fail(self, failure: FailureKind, detail: str, now: float, *, tell: bool) -> Step:
        return applied(*self._end(state_for(failure), now, failure, detail, tell=tell))

    def _late(self, what: str) -> Step:
        """A message about a lease that already ended: ignored, but if it ended in a failure
        the peer evidently missed, say so again (never in answer to a failure notice)."""
        reason = f"{what} after the lease ended ({self.state.value})"
        if self.notice is not None and what not in ("abort", "expired", "refused"):
            return ignored(reason, Send(self.notice))
        return ignored(reason)

    def _settle_quarantine(self) -> Step:
        self.in_flight = False
        return applied(*self._free())

    # ------------------------------------------------------------------ shared events
    def abort(self, now: float, detail: str = "aborted by the client") -> Step:
        """Client abort: ends a live lease (cancelling any transfer) and tells the peer."""
        if not self.live:
            return duplicate(f"lease already ended ({self.state.value})")
        return self._fail(FailureKind.CLIENT_ABORT, detail, now, tell=True)

    def _peer_ended(self, message: Abort | Expired, now: float) -> Step:
        if not self.live:
            return self._late(message.TYPE)
        failure = message.failure if isinstance(message, Abort) else FailureKind.EXPIRED
        return self._fail(failure, f"peer: {message.detail}", now, tell=False)

    def tick(self, now: float) -> tuple[list[Effect], bool]:
        """Expire when overdue, else send a keepalive when one is due. Returns (effects, expired)."""
        if self.live and now >= self.deadline:
            detail = f"no word from the {_peer(self.side)} for {self.config.ttl}s"
            return self._end(LeaseState.EXPIRED, now, FailureKind.EXPIRED, detail, tell=True), True
        if now - self.last_sent >= self.config.heartbeat_interval:
            message = self._keepalive(now)
            if message is not None:
                self.last_sent = now
                return [Send(message)], False
        return [], False

    def transfer_settled(self, outcome: TransferOutcome, now: float) -> Step:
        raise NotImplementedError

    def _keepalive(self, now: float) -> Message | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key}, {self.state.value}, blocks={list(self.blocks)}, in_flight={self.in_flight})"


def _peer(side: Side) -> str:
    return "consumer" if side is Side.PRODUCER else "producer"


class ProducerLease(_Lease):
    """The prefill side of one attempt: COMPUTING -> HELD -> SENDING -> RELEASED."""

    side = Side.PRODUCER

    def __init__(self, key: LeaseKey, request_id: str, num_blocks: int, num_bytes: int, config: LeaseConfig, now: float,
                 meta: str = "") -> None:
        super().__init__(key, request_id, LeaseState.COMPUTING, config, now)
        self.offer = ReserveRequest(key.lease_id, key.epoch, request_id, num_blocks, num_bytes, meta)
        self.peer_blocks: tuple[int, ...] | None = None  # the consumer's reservation, once known
        self.peer_meta = ""  # the consumer's Reserved.meta (hetpd: where to send the bytes)
        self.send_completed = False

    def hold(self, block_ids: tuple[int, ...], num_bytes: int, now: float) -> Step:
        """Prefill finished: the lease takes ownership of the request's pages. If the lease has
        already ended, it does not take them: the step says to free them."""
        if not self.live:
            return ignored(
                f"lease already ended ({self.state.value}); the pages go back to the pool",
                FreeBlocks(self.key, block_ids, num_bytes, refused=True),
            )
        if self.state is not LeaseState.COMPUTING:
            raise ValueError(f"lease {self.key} already holds pages ({self.state.value}); hold() once per lease")
        self.state = LeaseState.HELD
        effects: list[Effect] = [self._hold(block_ids, num_bytes)]
        if self.peer_blocks is not None:
            effects.extend(self._start_send(now))
        return applied(*effects)

    def _start_send(self, now: float) -> list[Effect]:
        assert self.peer_blocks is not None
        self.state, self.in_flight, self.last_sent = LeaseState.SENDING, True, now
        return [
            StartTransfer(self.transfer_id, self.key, "send", self.blocks, self.peer_blocks, self.peer_meta),
            Send(TransferPosted(self.key.lease_id, self.key.epoch, self.transfer_id)),
        ]

    def receive(self, message: Message, now: float) -> Step:
        """A message from the consumer about this attempt."""
        if isinstance(message, (Abort, Expired)):
            return self._peer_ended(message, now)
        if isinstance(message, Reserved):
            if self.state is LeaseState.RELEASED:
                # Only a stale duplicate can arrive now; if a forgotten attempt made the consumer
                # reserve again, the abort frees it (a committed consumer ignores it).
                return ignored("reserved after release", Send(Abort(self.key.lease_id, self.key.epoch, FailureKind.SUPERSEDED, "stale reservation")))
            if not self.live:
                return self._late("reserved")
            self.renew(now)
            if self.peer_blocks is not None:
                return duplicate("reservation already known")
            self.peer_blocks, self.peer_meta = message.block_ids, message.meta
            if self.state is LeaseState.HELD:
                return applied(*self._start_send(now))
            return applied()
        if isinstance(message, Refused):
            if not self.live:
                return self._late("refused")
            if self.peer_blocks is not None:
                return ignored("refused after reserved (stale message)")
            return self._fail(FailureKind.REFUSED, message.reason, now, tell=False)
        if isinstance(message, Committed):
            if self.state is LeaseState.RELEASED:
                return duplicate("already released", Send(ReleaseAck(self.key.lease_id, self.key.epoch)))
            if not self.live:
                return self._late("committed")
            if self.state is not LeaseState.SENDING:
                return ignored(f"commit while {self.state.value}: nothing was sent")
            effects = self._end(LeaseState.RELEASED, now, None, "consumer committed", tell=False)
            return applied(Send(ReleaseAck(self.key.lease_id, self.key.epoch)), *effects)
        if isinstance(message, Heartbeat):
            if not self.live:
                return self._late("heartbeat")
            self.renew(now)
            return applied()
        return ignored(f"{message.TYPE} is not a consumer-to-producer message")

    def transfer_settled(self, outcome: TransferOutcome, now: float) -> Step:
        """The transport says this side's send is over. Frees quarantined pages; a failed send
        ends a live lease."""
        if not self.in_flight:
            return ignored("no send in flight")
        if not self.live:
            return self._settle_quarantine()
        self.in_flight = False
        if outcome is TransferOutcome.COMPLETED:
            self.send_completed = True  # pages stay held until the consumer commits
            return applied()
        failure = FailureKind.CHECKSUM if outcome is TransferOutcome.CHECKSUM_FAILED else FailureKind.TRANSFER_CANCELLED
        return self._fail(failure, f"send {outcome.value}", now, tell=True)

    def _keepalive(self, now: float) -> Message | None:
        if not self.live:
            return None
        if self.peer_blocks is None:
            return self.offer  # the offer (or its answer) may have been lost
        if self.state is LeaseState.SENDING and not self.send_completed:
            return TransferPosted(self.key.lease_id, self.key.epoch, self.transfer_id)
        return Heartbeat(self.key.lease_id, self.key.epoch)


class ConsumerLease(_Lease):
    """The decode side of one attempt: RESERVED -> RECEIVING -> COMMITTED."""

    side = Side.CONSUMER

    def __init__(self, key: LeaseKey, request_id: str, config: LeaseConfig, now: float) -> None:
        super().__init__(key, request_id, LeaseState.RESERVED, config, now)
        self.acked = False  # the producer confirmed release (or ended): stop re-sending Committed
        self.meta = ""  # rides along in Reserved (hetpd: where the producer should send the bytes)

    @classmethod
    def reserved(cls, offer: ReserveRequest, block_ids: tuple[int, ...], num_bytes: int, config: LeaseConfig, now: float,
                 meta: str = "") -> tuple[ConsumerLease, Step]:
        lease = cls(LeaseKey(offer.lease_id, offer.epoch), offer.request_id, config, now)
        lease.meta = meta
        return lease, applied(lease._hold(block_ids, num_bytes), Send(lease._reserved_message()))

    @classmethod
    def ended(cls, key: LeaseKey, request_id: str, failure: FailureKind, detail: str, config: LeaseConfig, now: float, notice: Message | None) -> ConsumerLease:
        """A lease that ends before it held anything (refused, or aborted before admission); kept
        as a tombstone so a late offer for it is not admitted."""
        lease = cls(key, request_id, config, now)
        lease.state, lease.ended_at, lease.failure, lease.detail = state_for(failure), now, failure, detail
        lease.notice = notice
        return lease

    def _reserved_message(self) -> Reserved:
        return Reserved(self.key.lease_id, self.key.epoch, self.blocks, self.meta)

    def receive(self, message: Message, now: float) -> Step:
        """A message from the producer about this attempt."""
        if isinstance(message, (Abort, Expired)):
            if self.state is LeaseState.COMMITTED:
                self.acked = True  # the producer gave up on us; nothing more to tell it
                return ignored(f"late {message.TYPE} after commit")
            return self._peer_ended(message, now)
        if isinstance(message, ReserveRequest):
            if self.state in (LeaseState.RESERVED, LeaseState.RECEIVING):
                self.renew(now)
                return duplicate("already reserved", Send(self._reserved_message()))
            if isinstance(self.notice, Refused):
                return duplicate("already refused", Send(self.notice))
            return self._late("reserve_request")
        if isinstance(message, TransferPosted):
            if not self.live:
                return self._late("transfer_posted")
            self.renew(now)
            if self.state is LeaseState.RECEIVING:
                return duplicate("receive already posted")
            self.state, self.in_flight = LeaseState.RECEIVING, True
            return applied(StartTransfer(self.transfer_id, self.key, "receive", self.blocks, ()))
        if isinstance(message, ReleaseAck):
            if self.state is not LeaseState.COMMITTED:
                return ignored(f"release_ack while {self.state.value}")
            if self.acked:
                return duplicate("release already acknowledged")
            self.acked = True
            return applied()
        if isinstance(message, Heartbeat):
            if not self.live:
                return self._late("heartbeat")
            self.renew(now)
            return applied()
        return ignored(f"{message.TYPE} is not a producer-to-consumer message")

    def transfer_settled(self, outcome: TransferOutcome, now: float) -> Step:
        """The transport says this side's receive is over: commit on success (the pages move to
        the decode request), else fail and free the reservation."""
        if not self.in_flight:
            return ignored("no receive in flight")
        if not self.live:
            return self._settle_quarantine()
        self.in_flight = False
        if outcome is TransferOutcome.COMPLETED:
            adopt = AdoptBlocks(self.key, self.request_id, self.blocks, self.num_bytes)
            self.blocks = ()
            self.state, self.ended_at, self.last_sent = LeaseState.COMMITTED, now, now
            self.renew(now)  # re-send Committed for up to a ttl, until the producer acknowledges
            return applied(
                adopt,
                Send(Committed(self.key.lease_id, self.key.epoch)),
                Ended(self.key, self.side, LeaseState.COMMITTED, None, "bytes verified", self.request_id),
            )
        failure = FailureKind.CHECKSUM if outcome is TransferOutcome.CHECKSUM_FAILED else FailureKind.TRANSFER_CANCELLED
        return self._fail(failure, f"receive {outcome.value}", now, tell=True)

    def supersede(self, now: float) -> Step:
        """A newer attempt of the same lease arrived: the producer gave up on this one."""
        if not self.live:
            return ignored(f"already ended ({self.state.value})")
        return self._fail(FailureKind.SUPERSEDED, f"superseded by a newer attempt of {self.key.lease_id}", now, tell=False)

    def abort(self, now: float, detail: str = "aborted by the client") -> Step:
        if self.state is LeaseState.COMMITTED:
            return ignored("already committed: abort the running decode request instead")
        return super().abort(now, detail)

    def _keepalive(self, now: float) -> Message | None:
        if self.live:
            return Heartbeat(self.key.lease_id, self.key.epoch)
        if self.state is LeaseState.COMMITTED and not self.acked and now < self.deadline:
            return Committed(self.key.lease_id, self.key.epoch)  # until the producer acknowledges
        return None
