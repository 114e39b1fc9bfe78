"""What both sides' endpoints share: the lease table, the ledger, and running a step's effects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hetpd.ownership import (
    CapacityLedger,
    ConsumerLeases,
    Effect,
    Ended,
    FailureKind,
    LeaseKey,
    LeaseState,
    Message,
    ProducerLeases,
    Send,
    Side,
    Step,
    Tick,
    TransferOutcome,
)
from hetpd.transfer import TransferResult, TransferStatus


@dataclass(frozen=True)
class HandoffEvent:
    """A lease ended on this side: committed/released, or failed with ``failure`` and ``detail``."""

    request_id: str
    lease: LeaseKey
    state: LeaseState
    failure: FailureKind | None
    detail: str


class Endpoint:
    """Runs effects in order; subclasses handle the side-specific ones in :meth:`_apply`."""

    side: Side

    def __init__(self, leases: ProducerLeases | ConsumerLeases) -> None:
        self.ledger = CapacityLedger()
        self._leases = leases
        self._outbox: list[Message] = []
        self._events: list[HandoffEvent] = []
        # Called with (request_id, lifecycle step) as a handoff passes each step (for traces).
        self.on_step: Callable[[str, str], None] = lambda request_id, step: None

    def live_leases(self) -> int:
        return self._leases.live()

    def events(self) -> list[HandoffEvent]:
        """Leases that ended since the last call (drained)."""
        events, self._events = self._events, []
        return events

    def tick(self, now: float) -> list[Message]:
        """Expire overdue leases, send keepalives; returns the messages for the peer."""
        self._run(self._leases.tick(now), now)
        return self._drain()

    def receive(self, message: Message, now: float) -> list[Message]:
        """A message from the peer; returns the answers."""
        self._run(self._leases.receive(message, now), now)
        return self._drain()

    def _drain(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    def _run(self, step: Step | Tick, now: float) -> None:
        """Carry out a step's effects in order (effects may run further steps: they queue behind)."""
        # Book before applying: a FreeBlocks must find its holding in the ledger.
        self.ledger.apply(self.side, step.effects)
        for effect in step.effects:
            if isinstance(effect, Send):
                self._outbox.append(effect.message)
            elif isinstance(effect, Ended):
                if effect.state in (LeaseState.COMMITTED, LeaseState.RELEASED):
                    self.on_step(effect.request_id, "commit" if effect.state is LeaseState.COMMITTED else "release")
                self._events.append(HandoffEvent(effect.request_id, effect.lease, effect.state, effect.failure,
                                                 effect.detail))
            else:
                self._apply(effect, now)

    def _apply(self, effect: Effect, now: float) -> None:
        raise NotImplementedError


def outcome_of(result: TransferResult) -> TransferOutcome:
    """How a transport's result reads to a lease."""
    if result.ok:
        return TransferOutcome.COMPLETED
    if result.status is TransferStatus.FAILED and "checksum" in (result.error or ""):
        return TransferOutcome.CHECKSUM_FAILED
    return TransferOutcome.CANCELLED
