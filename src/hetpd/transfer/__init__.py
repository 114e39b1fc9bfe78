"""KV byte transports: move a request's KV bytes from the prefill side to the decode side.

Bytes only, no torch. ``base`` is the interface (and the rules, keyed and keyless); backends:
``inproc``, ``shm``, ``tcp``, ``nixl``; ``factory.make_sender`` / ``make_receiver`` pick one by
name; ``auth`` holds the key derivation and the connection handshake of the keyed mode.
"""

from __future__ import annotations

from hetpd.transfer.base import (
    FaultInjection,
    RegionDescriptor,
    Span,
    TransferReceiver,
    TransferResult,
    TransferSender,
    TransferStatus,
)
from hetpd.transfer.factory import BACKENDS, make_receiver, make_sender

__all__ = ["BACKENDS", "FaultInjection", "RegionDescriptor", "Span", "TransferReceiver", "TransferResult",
           "TransferSender", "TransferStatus", "make_receiver", "make_sender"]
