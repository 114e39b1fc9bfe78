"""The prefill side of KV handoffs: a prefill-role engine, its leases and a transport sender."""

from __future__ import annotations

import json

from hetpd.engine.engine import Engine
from hetpd.handoff.endpoint import Endpoint, outcome_of
from hetpd.kv.plan import HandoffPlan
from hetpd.kv.state import RuntimeKVState
from hetpd.ownership import (
    CancelTransfer,
    Effect,
    FreeBlocks,
    LeaseConfig,
    LeaseKey,
    Message,
    ProducerLeases,
    Side,
    StartTransfer,
)
from hetpd.transfer import RegionDescriptor, Span, TransferSender


class ProducerEndpoint(Endpoint):
    """Offers each handed-off request's KV to a consumer and sends it once pages are reserved.

    The KV is exported at offer time, already in the plan's wire format (narrowing conversions
    run here, before the wire). The engine keeps holding the request's pages until the lease
    says to free them: after the consumer committed, or when the handoff failed, expired or was
    aborted and no transfer reads them any more. Bytes leave in ``layers_per_post`` chunks, the
    way a layer-by-layer sender streams them.
    """

    side = Side.PRODUCER

    def __init__(self, engine: Engine, sender: TransferSender, plan: HandoffPlan, config: LeaseConfig | None = None,
                 layers_per_post: int = 8) -> None:
        self.leases = ProducerLeases(config)
        super().__init__(self.leases)
        self.engine = engine
        self.sender = sender
        self.plan = plan
        self.layers_per_post = max(1, layers_per_post)
        self._staged: dict[LeaseKey, RuntimeKVState] = {}  # until the lease frees the request's pages

    def offer(self, request_id: str, now: float, plan: HandoffPlan | None = None) -> list[Message]:
        """The engine handed ``request_id`` off (its pages are held): open a lease and offer it.
        ``plan``: this request's plan (its decode peer's), default the endpoint's."""
        state = self.engine.export_kv(request_id, (plan or self.plan).wire)
        blocks = self.engine.held_blocks(request_id)
        step = self.leases.open(request_id, request_id, len(blocks), state.nbytes, now, meta=state.manifest())
        key = LeaseKey(request_id, 1)
        self._staged[key] = state
        self.on_step(request_id, "lease_offered")
        self._run(step, now)
        self._run(self.leases.hold(request_id, blocks, state.nbytes, now), now)
        return self._drain()

    def poll(self, now: float) -> list[Message]:
        """Report finished sends to the leases."""
        for result in self.sender.poll():
            self._run(self.leases.transfer_settled(result.transfer_id, outcome_of(result), now), now)
        return self._drain()

    def abort(self, request_id: str, now: float, detail: str = "aborted by the client") -> list[Message]:
        self._run(self.leases.abort(request_id, now, detail), now)
        return self._drain()

    def _apply(self, effect: Effect, now: float) -> None:
        if isinstance(effect, StartTransfer):
            self._send(effect, now)
        elif isinstance(effect, CancelTransfer):
            result = self.sender.cancel(effect.transfer_id)  # once it returns, nothing reads the source
            self._run(self.leases.transfer_settled(effect.transfer_id, outcome_of(result), now), now)
        elif isinstance(effect, FreeBlocks):
            staged = self._staged.pop(effect.lease, None)
            if staged is not None and staged.request_id in self.engine.held_request_ids():
                self.engine.release_kv(staged.request_id)
            try:
                self.sender.unregister_region(str(effect.lease))
            except ValueError:
                pass  # never registered (the handoff ended before sending)

    def _send(self, effect: StartTransfer, now: float) -> None:
        state = self._staged[effect.lease]
        try:
            destination = RegionDescriptor.from_dict(json.loads(effect.peer_meta))
            payload = state.payload if isinstance(state.payload, bytearray) else bytearray(state.payload)
            self.sender.register_region(effect.transfer_id, payload)
            self.on_step(state.request_id, "transfer_start")
            layer_bytes, layers = state.layer_bytes(), state.num_layers
            for first in range(0, layers, self.layers_per_post):
                last = min(layers, first + self.layers_per_post)
                span = Span(first * layer_bytes, first * layer_bytes, (last - first) * layer_bytes)
                self.sender.post(effect.transfer_id, effect.transfer_id, destination, [span], final=last == layers)
        except ValueError as exc:  # a bad descriptor from the peer: this attempt cannot send
            self._run(self.leases.abort(state.request_id, now, f"cannot send KV: {exc}"), now)
