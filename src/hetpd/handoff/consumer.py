"""The decode side of KV handoffs: a decode-role engine, its leases and a transport receiver."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from hetpd.engine.engine import Engine
from hetpd.handoff.endpoint import Endpoint, outcome_of
from hetpd.kv.check import check
from hetpd.kv.format import KVFormat
from hetpd.kv.state import Residency, RuntimeKVState, manifest_nbytes
from hetpd.ownership import (
    AdoptBlocks,
    Admit,
    CancelTransfer,
    ConsumerLease,
    ConsumerLeases,
    Effect,
    FreeBlocks,
    LeaseConfig,
    LeaseKey,
    Message,
    ReserveRequest,
    Side,
    StartTransfer,
)
from hetpd.outputs import RequestOutput
from hetpd.sampling_params import SamplingParams
from hetpd.transfer import TransferReceiver, TransferResult, TransferStatus


@dataclass
class _Incoming:
    request_id: str
    manifest: str
    staging: bytearray  # where the transport writes; the engine's pages are written only at commit
    expecting: bool = True  # the receiver still has this transfer (no result delivered yet)
    # The bytes may land before the producer's TransferPosted does (data and control take
    # different paths); the result then waits here until the lease has posted its receive.
    early: TransferResult | None = None


class ConsumerEndpoint(Endpoint):
    """Admits offers by reserving pages first, receives the bytes into a staging region, and on
    a verified transfer converts them into the reserved pages and starts decoding.

    Offers whose KV format the engine cannot use are refused with the check's explanation;
    offers that do not fit (pages or sequence slots short) are refused with the reason. The
    transport writes only the staging region, and only this process writes the engine's pages
    (at commit), so a failed, expired or aborted handoff frees its pages right after the
    receive is cancelled, and never while bytes may still land.
    """

    side = Side.CONSUMER

    def __init__(self, engine: Engine, receiver: TransferReceiver, params_of: Callable[[str], SamplingParams],
                 config: LeaseConfig | None = None) -> None:
        self.leases = ConsumerLeases(config)
        super().__init__(self.leases)
        self.engine = engine
        self.receiver = receiver
        self.params_of = params_of  # the request's sampling params (the router knows them)
        self._incoming: dict[LeaseKey, _Incoming] = {}
        self._finished: list[RequestOutput] = []
        self.bytes_received = 0  # payload bytes of committed handoffs

    def poll(self, now: float) -> list[Message]:
        """Report finished receives to the leases (commit on verified bytes)."""
        for result in self.receiver.poll():
            incoming = self._settled(result.transfer_id)
            if incoming is not None and result.ok:
                self.on_step(incoming.request_id, "transfer_end")
            lease = self._lease_of(result.transfer_id)
            if incoming is not None and lease is not None and lease.live and not lease.in_flight:
                incoming.early = result  # TransferPosted is still on its way: settle when it arrives
                continue
            self._run(self.leases.transfer_settled(result.transfer_id, outcome_of(result), now), now)
        return self._drain()

    def _lease_of(self, transfer_id: str) -> ConsumerLease | None:
        for lease in self.leases:
            if lease.transfer_id == transfer_id:
                return lease
        return None

    def early_results(self) -> int:
        """Transfers whose bytes arrived before the producer's notice did (waiting for it)."""
        return sum(1 for incoming in self._incoming.values() if incoming.early is not None)

    def abort(self, request_id: str, now: float, detail: str = "aborted by the client") -> list[Message]:
        self._run(self.leases.abort(request_id, now, detail), now)
        return self._drain()

    def finished(self) -> list[RequestOutput]:
        """Requests whose imported first token already ended them (drained)."""
        out, self._finished = self._finished, []
        return out

    def _apply(self, effect: Effect, now: float) -> None:
        if isinstance(effect, Admit):
            self._admit(effect.offer, now)
        elif isinstance(effect, StartTransfer):
            # The receive was posted at reservation, before the producer could send; if the
            # bytes already arrived, this is the moment the lease can hear about it.
            incoming = self._incoming.get(effect.lease)
            if incoming is not None and incoming.early is not None:
                early, incoming.early = incoming.early, None
                self._run(self.leases.transfer_settled(effect.transfer_id, outcome_of(early), now), now)
        elif isinstance(effect, CancelTransfer):
            incoming = self._incoming.get(effect.lease)
            if incoming is not None and not incoming.expecting:  # its result was delivered already
                result = incoming.early or TransferResult(effect.transfer_id, TransferStatus.CANCELLED, 0, "cancelled")
            else:
                result = self.receiver.cancel(effect.transfer_id)  # once it returns, no byte lands in staging
                self._settled(effect.transfer_id)
            self._run(self.leases.transfer_settled(effect.transfer_id, outcome_of(result), now), now)
        elif isinstance(effect, AdoptBlocks):
            self._commit(effect)
        elif isinstance(effect, FreeBlocks):
            incoming = self._incoming.pop(effect.lease, None)
            if incoming is not None:
                if incoming.expecting:  # reserved, never posted: stop expecting before the staging goes
                    self.receiver.cancel(str(effect.lease))
                self.receiver.unregister_region(str(effect.lease))
                self.engine.cancel_reservation(incoming.request_id)

    def _settled(self, transfer_id: str) -> _Incoming | None:
        for key, incoming in self._incoming.items():
            if str(key) == transfer_id:
                incoming.expecting = False
                return incoming
        return None

    def _admit(self, offer: ReserveRequest, now: float) -> None:
        try:
            manifest = json.loads(offer.meta)
            fmt = KVFormat.from_json(json.dumps(manifest["format"]))
            nbytes = manifest_nbytes(offer.meta)
            num_tokens = int(manifest["token_end"]) - int(manifest["token_start"])
        except (ValueError, KeyError, TypeError) as exc:
            self._run(self.leases.refuse(offer, f"unreadable KV manifest: {exc}", now), now)
            return
        verdict = check(fmt, self.engine.kv_format)
        if not verdict.usable:
            self._run(self.leases.refuse(offer, "incompatible KV: " + verdict.explain(), now), now)
            return
        reservation = self.engine.reserve_kv(offer.request_id, num_tokens)
        if not reservation.accepted:
            self._run(self.leases.refuse(offer, reservation.reason, now), now)
            return
        key = LeaseKey(offer.lease_id, offer.epoch)
        staging = bytearray(nbytes)
        descriptor = self.receiver.register_region(str(key), staging)
        self.receiver.expect(str(key), str(key), nbytes=nbytes)  # a short or empty "final" never commits
        self._incoming[key] = _Incoming(offer.request_id, offer.meta, staging)
        self.on_step(offer.request_id, "reserve")
        self._run(self.leases.reserve(offer, reservation.blocks, nbytes, now, meta=json.dumps(descriptor.to_dict())),
                  now)

    def _commit(self, effect: AdoptBlocks) -> None:
        incoming = self._incoming.pop(effect.lease)
        self.receiver.unregister_region(str(effect.lease))
        self.bytes_received += len(incoming.staging)
        state = RuntimeKVState.from_manifest(incoming.manifest, incoming.staging, residency=Residency.HOST,
                                             location="staging", owner=f"decode:{incoming.request_id}")
        result = self.engine.commit_kv(state, self.params_of(incoming.request_id), incoming.request_id)
        if result.finished is not None:
            self._finished.append(result.finished)
