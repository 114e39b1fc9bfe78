"""The vocabulary of KV ownership: lease keys and states, and the effects a caller carries out.

The lease state machines are sans-IO: they never touch a pool, a socket, a transport or a
clock. Each call returns a :class:`Step` whose ``effects`` the caller performs, in order:

* :class:`Send`: send ``message`` to the peer (best effort: drops and duplicates are fine).
* :class:`Admit` (consumer): a new offer arrived; decide now or later, then call
  ``ConsumerLeases.reserve`` (with pages you allocated) or ``ConsumerLeases.refuse``.
* :class:`HoldBlocks`: ownership of these pages moved into the lease (from the prefill
  sequence, or from the allocator on the consumer); nobody else may free or reuse them.
* :class:`StartTransfer`: post this side's end of the transfer (producer: send from
  ``block_ids``; consumer: receive into ``block_ids``). Report its end with ``transfer_settled``.
* :class:`CancelTransfer`: ask the transport to cancel. The pages stay quarantined until the
  transport reports the transfer settled (cancelled, or completed after all).
* :class:`FreeBlocks`: give these pages back to the pool (``BlockAllocator.free``).
* :class:`AdoptBlocks` (consumer): the pages now belong to the running decode request.
* :class:`Ended`: the lease reached a terminal state (a failure is worth a recovery decision).

Pages leave a lease exactly once, through either ``FreeBlocks`` or ``AdoptBlocks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, Union

from hetpd.ownership.messages import FailureKind, Message, ReserveRequest


class Side(str, Enum):
    PRODUCER = "producer"
    CONSUMER = "consumer"


class LeaseState(str, Enum):
    """Producer: COMPUTING -> HELD -> SENDING -> RELEASED. Consumer: RESERVED -> RECEIVING ->
    COMMITTED. Either side may end in FAILED, EXPIRED or ABORTED instead."""

    COMPUTING = "computing"  # producer: prefill running; its pages still belong to the sequence
    HELD = "held"  # producer: prefill done, the lease owns the pages, waiting for a reservation
    SENDING = "sending"  # producer: send posted (or done), waiting for the consumer's commit
    RELEASED = "released"  # producer: consumer committed; pages freed (once the send settled)
    RESERVED = "reserved"  # consumer: pages reserved, no bytes yet
    RECEIVING = "receiving"  # consumer: receive posted, bytes may be landing
    COMMITTED = "committed"  # consumer: bytes verified, pages adopted by the decode request
    FAILED = "failed"
    EXPIRED = "expired"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def success(self) -> bool:
        return self in (LeaseState.RELEASED, LeaseState.COMMITTED)


_TERMINAL = frozenset(
    {LeaseState.RELEASED, LeaseState.COMMITTED, LeaseState.FAILED, LeaseState.EXPIRED, LeaseState.ABORTED}
)


def state_for(failure: FailureKind) -> LeaseState:
    """The terminal state a failure leads to, the same on both sides."""
    if failure is FailureKind.CLIENT_ABORT:
        return LeaseState.ABORTED
    if failure is FailureKind.EXPIRED:
        return LeaseState.EXPIRED
    return LeaseState.FAILED


@dataclass(frozen=True, order=True)
class LeaseKey:
    """One handoff attempt: a lease id and its attempt number (epoch, from 1)."""

    lease_id: str
    epoch: int

    def __str__(self) -> str:
        return f"{self.lease_id}@{self.epoch}"


class TransferOutcome(str, Enum):
    """How the transport reported one end of a transfer settled."""

    COMPLETED = "completed"  # all bytes moved (and, on the receiving end, verified)
    CHECKSUM_FAILED = "checksum_failed"
    CANCELLED = "cancelled"  # cancelled on request, or the transport gave up


class Outcome(str, Enum):
    APPLIED = "applied"  # the event changed the lease
    DUPLICATE = "duplicate"  # a repeat of something already applied: no change (maybe a re-sent answer)
    IGNORED = "ignored"  # late, stale or unknown: no change (``reason`` says which)


@dataclass(frozen=True)
class Send:
    message: Message


@dataclass(frozen=True)
class Admit:
    offer: ReserveRequest


@dataclass(frozen=True)
class HoldBlocks:
    lease: LeaseKey
    block_ids: tuple[int, ...]
    num_bytes: int


@dataclass(frozen=True)
class StartTransfer:
    transfer_id: str
    lease: LeaseKey
    direction: Literal["send", "receive"]
    block_ids: tuple[int, ...]  # this side's pages
    peer_block_ids: tuple[int, ...]  # the other side's pages, where known (producer: the reservation)
    peer_meta: str = ""  # the consumer's Reserved.meta, for the producer's send


@dataclass(frozen=True)
class CancelTransfer:
    transfer_id: str
    lease: LeaseKey


@dataclass(frozen=True)
class FreeBlocks:
    """Free these pages. ``refused``: pages the caller offered to a lease that had already ended
    (or that already held pages); they never belonged to the lease, free them all the same."""

    lease: LeaseKey
    block_ids: tuple[int, ...]
    num_bytes: int
    refused: bool = False


@dataclass(frozen=True)
class AdoptBlocks:
    lease: LeaseKey
    request_id: str
    block_ids: tuple[int, ...]
    num_bytes: int


@dataclass(frozen=True)
class Ended:
    lease: LeaseKey
    side: Side
    state: LeaseState
    failure: FailureKind | None
    detail: str
    request_id: str = ""


Effect = Union[Send, Admit, HoldBlocks, StartTransfer, CancelTransfer, FreeBlocks, AdoptBlocks, Ended]


@dataclass(frozen=True)
class Step:
    """What one event did: ``outcome`` (+ ``reason`` when not applied) and the effects to carry out."""

    outcome: Outcome
    effects: tuple[Effect, ...] = ()
    reason: str = ""

    @property
    def messages(self) -> tuple[Message, ...]:
        return tuple(e.message for e in self.effects if isinstance(e, Send))


def applied(*effects: Effect) -> Step:
    return Step(Outcome.APPLIED, effects)


def duplicate(reason: str, *effects: Effect) -> Step:
    return Step(Outcome.DUPLICATE, effects, reason)


def ignored(reason: str, *effects: Effect) -> Step:
    return Step(Outcome.IGNORED, effects, reason)


@dataclass(frozen=True)
class Tick:
    """What ``tick(now)`` did over a whole table: effects, the leases that expired, and how many
    finished leases were forgotten (their memory served to answer late messages)."""

    effects: tuple[Effect, ...]
    expired: tuple[LeaseKey, ...]
    pruned: int
