"""Stateful property test: a prefill worker and a decode worker hand KV over a hostile network.

Each side owns a real :class:`BlockAllocator` and a lease table; the harness carries out every
effect the tables return, the way a worker would, and keeps an explicit owner for every page
(the pool's free list, the prefill sequence, a lease, a pending admission, a running decode
request). The network delivers in any order, duplicates, drops and delays; transports settle
(completed, checksum failure, cancelled) in any order; clients abort; either side crashes and
restarts empty (messages to the dead incarnation are dropped or reach the new one).

After every step: one owner per page, matching the pool's reference counts; no page freed or
adopted while a transfer end on its side is unsettled; each side's in-flight transfers match
its table; the ledger equals what the leases hold; a producer released only leases the
consumer committed. At teardown, after every TTL passes and everything settles: every lease
is terminal and every pool is entirely free again.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hetpd.core.block_allocator import BlockAllocator
from hetpd.ownership import (
    AdoptBlocks,
    Admit,
    CancelTransfer,
    CapacityLedger,
    ConsumerLeases,
    Effect,
    Ended,
    FailureKind,
    FreeBlocks,
    HoldBlocks,
    LeaseConfig,
    LeaseKey,
    LeaseState,
    ProducerLeases,
    RecoveryPolicy,
    Retry,
    ReserveRequest,
    Send,
    Side,
    StartTransfer,
    TransferOutcome,
    decide,
    message_from_dict,
)

CONFIG = LeaseConfig(ttl=3.0, heartbeat_interval=1.0, retain=4.0)
RETRY = RecoveryPolicy("retry", max_attempts=3, peer="same")
BYTES_PER_BLOCK = 1000
POOL_BLOCKS = {Side.PRODUCER: 10, Side.CONSUMER: 8}
INDEX = st.integers(min_value=0, max_value=10_000)
SIDES = st.sampled_from([Side.PRODUCER, Side.CONSUMER])
# Completion is the common case; failures are frequent enough to matter.
OUTCOMES = st.sampled_from([TransferOutcome.COMPLETED] * 3 + [TransferOutcome.CHECKSUM_FAILED, TransferOutcome.CANCELLED])

Owner = tuple[str, str]  # ("computing", lease id) | ("admitting", key) | ("lease", key) | ("request", key)


@dataclass
class _Transfer:
    lease: LeaseKey
    block_ids: tuple[int, ...]
    cancel_requested: bool = False


@dataclass
class World:
    """One worker incarnation: its pool, its table, and what the worker process would track."""

    side: Side
    incarnation: int
    pool: BlockAllocator = field(init=False)
    table: ProducerLeases | ConsumerLeases = field(init=False)
    owner: dict[int, Owner] = field(default_factory=dict)
    transfers: dict[str, _Transfer] = field(default_factory=dict)  # this side's unsettled ends
    computing: dict[str, tuple[int, ...]] = field(default_factory=dict)  # producer: prefill running
    pending_admits: list[ReserveRequest] = field(default_factory=list)  # consumer
    running: dict[str, tuple[int, ...]] = field(default_factory=dict)  # consumer: decode requests

    def __post_init__(self) -> None:
        self.pool = BlockAllocator(POOL_BLOCKS[self.side], block_size=4, enable_prefix_caching=False)
        self.table = ProducerLeases(CONFIG) if self.side is Side.PRODUCER else ConsumerLeases(CONFIG)

    @property
    def producer(self) -> ProducerLeases:
        assert isinstance(self.table, ProducerLeases)
        return self.table

    @property
    def consumer(self) -> ConsumerLeases:
        assert isinstance(self.table, ConsumerLeases)
        return self.table

    def take(self, block_ids: tuple[int, ...], expected: set[Owner], new_owner: Owner | None) -> None:
        for block in block_ids:
            assert self.owner.get(block) in expected, f"{self.side.value} page {block} owned by {self.owner.get(block)}, expected {expected}"
            busy = [tid for tid, t in self.transfers.items() if block in t.block_ids]
            assert not busy, f"{self.side.value} page {block} changes owner while transfer {busy} may touch it"
            if new_owner is None:
                del self.owner[block]
            else:
                self.owner[block] = new_owner


class OwnershipMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.worlds = {side: World(side, 0) for side in Side}
        self.ledger = CapacityLedger()
        self.network: list[tuple[Side, int, str]] = []  # (to side, to incarnation, JSON)
        self.posted_sends: set[str] = set()  # transfer ids a producer ever posted (bytes could flow)
        self.committed: set[LeaseKey] = set()  # keys any consumer incarnation committed
        self.settled: list[tuple[Side, str]] = []
        # (producer incarnation, key, failure, request id, blocks) of failed attempts to recover
        self.retries: list[tuple[int, LeaseKey, FailureKind, str, int]] = []
        self.counter = 0

    # ------------------------------------------------------------------ effects
    def perform(self, side: Side, effects: tuple[Effect, ...]) -> None:
        world = self.worlds[side]
        peer = Side.CONSUMER if side is Side.PRODUCER else Side.PRODUCER
        for effect in effects:
            if isinstance(effect, Send):
                wire = json.dumps(effect.message.to_dict())
                self.network.append((peer, self.worlds[peer].incarnation, wire))
            elif isinstance(effect, Admit):
                world.pending_admits.append(effect.offer)
            elif isinstance(effect, HoldBlocks):
                if side is Side.PRODUCER:
                    expected: Owner = ("computing", effect.lease.lease_id)
                else:
                    expected = ("admitting", str(effect.lease))
                world.take(effect.block_ids, {expected}, ("lease", str(effect.lease)))
            elif isinstance(effect, StartTransfer):
                assert effect.transfer_id not in world.transfers, f"transfer {effect.transfer_id} posted twice"
                assert all(world.owner.get(b) == ("lease", str(effect.lease)) for b in effect.block_ids)
                world.transfers[effect.transfer_id] = _Transfer(effect.lease, effect.block_ids)
                if effect.direction == "send":
                    assert effect.peer_block_ids, "send posted before the consumer reserved"
                    self.posted_sends.add(effect.transfer_id)
            elif isinstance(effect, CancelTransfer):
                world.transfers[effect.transfer_id].cancel_requested = True
            elif isinstance(effect, FreeBlocks):
                if effect.refused:
                    expected_owners = {("computing", effect.lease.lease_id), ("admitting", str(effect.lease))}
                else:
                    expected_owners = {("lease", str(effect.lease))}
                world.take(effect.block_ids, expected_owners, None)
                world.pool.free(list(effect.block_ids))
            elif isinstance(effect, AdoptBlocks):
                assert side is Side.CONSUMER
                world.take(effect.block_ids, {("lease", str(effect.lease))}, ("request", str(effect.lease)))
                world.running[str(effect.lease)] = effect.block_ids
                assert effect.lease not in self.committed, f"{effect.lease} committed twice"
                self.committed.add(effect.lease)
            elif isinstance(effect, Ended):
                assert effect.side is side
                if effect.state is LeaseState.RELEASED:
                    assert effect.lease in self.committed, f"producer released {effect.lease} before any commit"
                if side is Side.PRODUCER and effect.failure is not None:
                    lease = world.producer.get(effect.lease.lease_id, effect.lease.epoch)
                    assert lease is not None
                    self.retries.append((world.incarnation, effect.lease, effect.failure, lease.request_id, lease.offer.num_blocks))
        self.ledger.apply(side, effects)

    def deliver(self, position: int, to_new_incarnation: bool) -> None:
        to, incarnation, wire = self.network.pop(position)
        world = self.worlds[to]
        if incarnation != world.incarnation and not to_new_incarnation:
            return  # addressed to a dead incarnation: dropped
        step = world.table.receive(message_from_dict(json.loads(wire)), self.now)
        self.perform(to, step.effects)

    def tick(self) -> None:
        for side in Side:
            self.perform(side, self.worlds[side].table.tick(self.now).effects)

    def settle(self, side: Side, transfer_id: str, outcome: TransferOutcome) -> None:
        world = self.worlds[side]
        world.transfers.pop(transfer_id)
        if side is Side.CONSUMER and outcome is TransferOutcome.COMPLETED and transfer_id not in self.posted_sends:
            outcome = TransferOutcome.CANCELLED  # no bytes could have arrived: nobody sent them
        step = world.table.transfer_settled(transfer_id, outcome, self.now)
        self.settled.append((side, transfer_id))
        self.perform(side, step.effects)

    def admit(self, offer: ReserveRequest, accept: bool) -> None:
        world = self.worlds[Side.CONSUMER]
        if accept and world.pool.num_available() >= offer.num_blocks:
            blocks = tuple(world.pool.allocate(offer.num_blocks))
            key = str(LeaseKey(offer.lease_id, offer.epoch))
            for block in blocks:
                assert block not in world.owner
                world.owner[block] = ("admitting", key)
            step = world.consumer.reserve(offer, blocks, offer.num_blocks * BYTES_PER_BLOCK, self.now)
        else:
            step = world.consumer.refuse(offer, "pages short", self.now)
        self.perform(Side.CONSUMER, step.effects)

    def finish_compute(self, lease_id: str) -> None:
        world = self.worlds[Side.PRODUCER]
        blocks = world.computing[lease_id]
        step = world.producer.hold(lease_id, blocks, len(blocks) * BYTES_PER_BLOCK, self.now)
        del world.computing[lease_id]  # the pages went to the lease (HoldBlocks) or back to the pool
        self.perform(Side.PRODUCER, step.effects)

    # ------------------------------------------------------------------ rules
    @rule(num_blocks=st.integers(min_value=1, max_value=3))
    def open_request(self, num_blocks: int) -> None:
        world = self.worlds[Side.PRODUCER]
        if world.pool.num_available() < num_blocks:
            return
        self.counter += 1
        lease_id = f"r{self.counter}.p{world.incarnation}"
        blocks = tuple(world.pool.allocate(num_blocks))
        for block in blocks:
            world.owner[block] = ("computing", lease_id)
        world.computing[lease_id] = blocks
        step = world.producer.open(lease_id, f"req{self.counter}", num_blocks, num_blocks * BYTES_PER_BLOCK, self.now)
        self.perform(Side.PRODUCER, step.effects)

    def retry(self, incarnation: int, key: LeaseKey, failure: FailureKind, request_id: str, num_blocks: int) -> None:
        world = self.worlds[Side.PRODUCER]
        action = decide(RETRY, failure, key.epoch, "d0", ["d0"])
        if incarnation != world.incarnation or not isinstance(action, Retry):
            return  # the producer restarted since (its client went with it), or out of attempts
        if key.lease_id not in world.computing:  # a prefill still running serves the retry too
            if world.pool.num_available() < num_blocks:
                return
            blocks = tuple(world.pool.allocate(num_blocks))
            for block in blocks:
                world.owner[block] = ("computing", key.lease_id)
            world.computing[key.lease_id] = blocks
        step = world.producer.open(key.lease_id, request_id, num_blocks, num_blocks * BYTES_PER_BLOCK, self.now, epoch=action.attempt)
        self.perform(Side.PRODUCER, step.effects)

    @precondition(lambda self: self.retries)
    @rule()
    def recover_failed_handoffs(self) -> None:
        while self.retries:
            self.retry(*self.retries.pop(0))

    @precondition(lambda self: self.worlds[Side.PRODUCER].computing)
    @rule(index=INDEX)
    def prefill_done(self, index: int) -> None:
        computing = sorted(self.worlds[Side.PRODUCER].computing)
        self.finish_compute(computing[index % len(computing)])

    @precondition(lambda self: self.worlds[Side.CONSUMER].pending_admits)
    @rule(index=INDEX, accept=st.booleans())
    def decide_admission(self, index: int, accept: bool) -> None:
        pending = self.worlds[Side.CONSUMER].pending_admits
        self.admit(pending.pop(index % len(pending)), accept)

    @precondition(lambda self: self.network)
    @rule(index=INDEX, to_new=st.booleans())
    def deliver_message(self, index: int, to_new: bool) -> None:
        self.deliver(index % len(self.network), to_new)

    @precondition(lambda self: self.network)
    @rule(seed=INDEX)
    def deliver_everything_shuffled(self, seed: int) -> None:
        # Makes progress likely within a short run; the one-at-a-time rules cover the rest.
        order = list(range(len(self.network)))
        random.Random(seed).shuffle(order)
        batch = [self.network[i] for i in order]
        self.network = []
        for entry in batch:
            self.network.insert(0, entry)
            self.deliver(0, to_new_incarnation=seed % 2 == 0)

    @rule(seed=INDEX)
    def pump(self, seed: int) -> None:
        """A healthy stretch: every prefill finishes, every offer is admitted, every message
        arrives (shuffled). Without it most runs never reach the later states."""
        for lease_id in sorted(self.worlds[Side.PRODUCER].computing):
            self.finish_compute(lease_id)
        for _ in range(3):
            pending = self.worlds[Side.CONSUMER].pending_admits
            while pending:
                self.admit(pending.pop(0), accept=True)
            if self.network:
                self.deliver_everything_shuffled(seed)

    @rule(accept=st.integers(min_value=0, max_value=3))
    def decide_all_admissions(self, accept: int) -> None:
        pending = self.worlds[Side.CONSUMER].pending_admits
        while pending:
            self.admit(pending.pop(0), accept > 0)

    @precondition(lambda self: self.network)
    @rule(index=INDEX)
    def duplicate_message(self, index: int) -> None:
        self.network.append(self.network[index % len(self.network)])

    @precondition(lambda self: self.network)
    @rule(index=INDEX)
    def drop_message(self, index: int) -> None:
        self.network.pop(index % len(self.network))

    @rule(dt=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.5, 1.0, 4.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt
        self.tick()

    @rule(side=SIDES, index=INDEX, outcome=OUTCOMES)
    def transport_settles(self, side: Side, index: int, outcome: TransferOutcome) -> None:
        ids = sorted(self.worlds[side].transfers)
        if ids:
            self.settle(side, ids[index % len(ids)], outcome)

    @precondition(lambda self: self.settled)
    @rule(index=INDEX, outcome=OUTCOMES)
    def transport_reports_twice(self, index: int, outcome: TransferOutcome) -> None:
        side, transfer_id = self.settled[index % len(self.settled)]
        if transfer_id in self.worlds[side].transfers:
            return  # posted again after a restart: not a repeat
        step = self.worlds[side].table.transfer_settled(transfer_id, outcome, self.now)
        assert not step.effects, f"a repeated settle report did something: {step}"

    # Aborts and crashes only fire on some draws: at full rate they end nearly every lease
    # before its transfer starts, and the later states would go untested.
    @rule(side=SIDES, index=INDEX, roll=st.integers(min_value=0, max_value=2))
    def client_aborts(self, side: Side, index: int, roll: int) -> None:
        if roll:
            return
        leases = sorted({lease.key.lease_id for lease in self.worlds[side].table})
        if leases:
            self.perform(side, self.worlds[side].table.abort(leases[index % len(leases)], self.now).effects)

    @rule(side=SIDES, roll=st.integers(min_value=0, max_value=4))
    def crash(self, side: Side, roll: int) -> None:
        if roll:
            return
        # The process dies with its pool, leases and transfer ends; its peer notices only
        # through silence or "unknown lease" answers.
        self.worlds[side] = World(side, self.worlds[side].incarnation + 1)
        self.ledger.reset(side)

    @precondition(lambda self: self.worlds[Side.CONSUMER].running)
    @rule(index=INDEX)
    def decode_finishes(self, index: int) -> None:
        world = self.worlds[Side.CONSUMER]
        key = sorted(world.running)[index % len(world.running)]
        blocks = world.running.pop(key)
        world.take(blocks, {("request", key)}, None)
        world.pool.free(list(blocks))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def pages_have_one_owner(self) -> None:
        for world in self.worlds.values():
            world.pool.check_invariants()
            for block in range(world.pool.num_blocks):
                count = world.pool.ref_count(block)
                assert count <= 1, f"{world.side.value} page {block} has {count} holders"
                assert (count == 1) == (block in world.owner), f"{world.side.value} page {block}: ref {count}, owner {world.owner.get(block)}"
            held: dict[str, set[int]] = {}
            for block, (kind, name) in world.owner.items():
                if kind == "lease":
                    held.setdefault(name, set()).add(block)
            assert held == {str(k): set(b) for k, b in world.table.holdings().items()}

    @invariant()
    def transfers_match_and_touch_owned_pages(self) -> None:
        for world in self.worlds.values():
            assert set(world.table.in_flight()) == set(world.transfers)
            for transfer in world.transfers.values():
                for block in transfer.block_ids:
                    assert world.owner.get(block) == ("lease", str(transfer.lease)), "in-flight page left its lease"

    @invariant()
    def ledger_matches_leases(self) -> None:
        snapshot = self.ledger.snapshot()
        for world in self.worlds.values():
            expected = {lease.key: (len(lease.blocks), lease.num_bytes) for lease in world.table if lease.blocks}
            booked = {key: (h.blocks, h.num_bytes) for key, h in snapshot.side(world.side).leases.items()}
            assert booked == expected
            usage = snapshot.side(world.side)
            assert usage.blocks == sum(b for b, _ in expected.values()) <= usage.peak_blocks

    def teardown(self) -> None:
        for _ in range(20):
            producer, consumer = self.worlds[Side.PRODUCER], self.worlds[Side.CONSUMER]
            for lease_id in sorted(producer.computing):
                self.finish_compute(lease_id)
            while consumer.pending_admits:
                self.admit(consumer.pending_admits.pop(0), accept=True)
            while self.retries:
                self.retry(*self.retries.pop(0))
            while self.network:
                self.deliver(0, to_new_incarnation=False)
            for side in Side:
                for transfer_id in sorted(self.worlds[side].transfers):
                    cancelled = self.worlds[side].transfers[transfer_id].cancel_requested
                    self.settle(side, transfer_id, TransferOutcome.CANCELLED if cancelled else TransferOutcome.COMPLETED)
            if self.network or consumer.pending_admits or producer.computing or self.retries:
                continue
            if any(w.transfers for w in self.worlds.values()) or any(w.table.live() for w in self.worlds.values()):
                self.now += CONFIG.ttl + 0.1
                self.tick()
                continue
            break
        consumer = self.worlds[Side.CONSUMER]
        for key in sorted(consumer.running):
            blocks = consumer.running.pop(key)
            consumer.take(blocks, {("request", key)}, None)
            consumer.pool.free(list(blocks))
        for world in self.worlds.values():
            assert all(lease.state.terminal for lease in world.table), list(world.table)
            assert not world.table.holdings() and not world.table.in_flight() and not world.transfers
            assert not world.owner, f"{world.side.value} pages leaked: {world.owner}"
            stats = world.pool.stats()
            assert stats.num_in_use == 0 and stats.num_free == stats.num_blocks
        snapshot = self.ledger.snapshot()
        assert snapshot.total_bytes == 0 and snapshot.producer.blocks == snapshot.consumer.blocks == 0


OwnershipMachine.TestCase.settings = settings(
    max_examples=1000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOwnership = OwnershipMachine.TestCase
