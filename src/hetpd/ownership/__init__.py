"""Decision 3, KV ownership: who owns every KV page during a prefill -> decode handoff.

Sans-IO state machines (no torch, no I/O, no threads, no clock: ``now`` is passed in), so a
worker process and the planner's discrete-event simulator drive the very same code.

* :mod:`~hetpd.ownership.messages`: the protocol messages (JSON, ``type``-tagged).
* :mod:`~hetpd.ownership.effects`: lease keys and states, the effects a caller carries out.
* :mod:`~hetpd.ownership.lease`: one attempt's state machine per side, with TTL and quarantine.
* :mod:`~hetpd.ownership.tables`: what a worker owns: every lease of its side, by lease id.
* :mod:`~hetpd.ownership.ledger`: pages and bytes tied up by handoffs, with peaks.
* :mod:`~hetpd.ownership.recovery`: retry / recompute / fail, decided by a pure function.
"""

from hetpd.ownership.effects import (
    AdoptBlocks,
    Admit,
    CancelTransfer,
    Effect,
    Ended,
    FreeBlocks,
    HoldBlocks,
    LeaseKey,
    LeaseState,
    Outcome,
    Send,
    Side,
    StartTransfer,
    Step,
    Tick,
    TransferOutcome,
)
from hetpd.ownership.lease import ConsumerLease, LeaseConfig, ProducerLease
from hetpd.ownership.ledger import CapacityLedger, Holding, LedgerSnapshot, SideUsage
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
    message_from_dict,
    message_to_dict,
)
from hetpd.ownership.recovery import Fail, Recompute, RecoveryAction, RecoveryPolicy, Retry, decide
from hetpd.ownership.tables import ConsumerLeases, ProducerLeases

__all__ = [
    "Abort",
    "AdoptBlocks",
    "Admit",
    "CancelTransfer",
    "CapacityLedger",
    "Committed",
    "ConsumerLease",
    "ConsumerLeases",
    "Effect",
    "Ended",
    "Expired",
    "Fail",
    "FailureKind",
    "FreeBlocks",
    "Heartbeat",
    "HoldBlocks",
    "Holding",
    "LeaseConfig",
    "LeaseKey",
    "LeaseState",
    "LedgerSnapshot",
    "Message",
    "Outcome",
    "ProducerLease",
    "ProducerLeases",
    "Recompute",
    "RecoveryAction",
    "RecoveryPolicy",
    "Refused",
    "ReleaseAck",
    "Reserved",
    "ReserveRequest",
    "Retry",
    "Send",
    "Side",
    "SideUsage",
    "StartTransfer",
    "Step",
    "Tick",
    "TransferOutcome",
    "TransferPosted",
    "decide",
    "message_from_dict",
    "message_to_dict",
]
