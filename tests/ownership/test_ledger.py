"""The transient-capacity ledger follows the lease effects, per side, with peaks."""

from __future__ import annotations

import pytest

from hetpd.ownership import (
    AdoptBlocks,
    CapacityLedger,
    ConsumerLeases,
    FreeBlocks,
    Holding,
    HoldBlocks,
    LeaseKey,
    ProducerLeases,
    Reserved,
    ReserveRequest,
    Side,
    TransferOutcome,
    TransferPosted,
)

A, B = LeaseKey("a", 1), LeaseKey("b", 1)


def test_totals_per_lease_and_peaks() -> None:
    ledger = CapacityLedger()
    ledger.apply(Side.PRODUCER, [HoldBlocks(A, (1, 2), 2000)])
    ledger.apply(Side.CONSUMER, [HoldBlocks(A, (5,), 500), HoldBlocks(B, (6, 7, 8), 1500)])
    snap = ledger.snapshot()
    assert snap.producer.leases == {A: Holding(2, 2000)} and snap.producer.num_bytes == 2000
    assert snap.consumer.blocks == 4 and snap.consumer.num_bytes == 2000
    assert snap.total_bytes == snap.peak_total_bytes == 4000

    ledger.apply(Side.CONSUMER, [AdoptBlocks(A, "req", (5,), 500)])
    ledger.apply(Side.PRODUCER, [FreeBlocks(A, (1, 2), 2000)])
    snap = ledger.snapshot()
    assert snap.producer.blocks == 0 and snap.producer.peak_blocks == 2 and snap.producer.peak_bytes == 2000
    assert snap.consumer.leases == {B: Holding(3, 1500)} and snap.consumer.peak_blocks == 4
    assert snap.total_bytes == 1500 and snap.peak_total_bytes == 4000
    assert snap.side(Side.CONSUMER) is snap.consumer


def test_pages_a_lease_refused_are_not_booked() -> None:
    ledger = CapacityLedger()
    ledger.apply(Side.CONSUMER, [HoldBlocks(A, (1,), 100)])
    ledger.apply(Side.CONSUMER, [FreeBlocks(A, (2,), 100, refused=True)])  # a second reserve, handed back
    assert ledger.snapshot().consumer.leases == {A: Holding(1, 100)}


def test_misapplied_effects_are_loud() -> None:
    ledger = CapacityLedger()
    ledger.apply(Side.PRODUCER, [HoldBlocks(A, (1,), 100)])
    with pytest.raises(ValueError, match="already holds pages"):
        ledger.apply(Side.PRODUCER, [HoldBlocks(A, (2,), 100)])
    with pytest.raises(ValueError, match="holds no pages"):
        ledger.apply(Side.CONSUMER, [FreeBlocks(A, (1,), 100)])


def test_reset_forgets_a_restarted_side_but_keeps_peaks() -> None:
    ledger = CapacityLedger()
    ledger.apply(Side.PRODUCER, [HoldBlocks(A, (1, 2, 3), 300)])
    ledger.reset(Side.PRODUCER)
    snap = ledger.snapshot()
    assert snap.producer.blocks == 0 and snap.producer.peak_blocks == 3 and snap.peak_total_bytes == 300


def test_ledger_fed_by_a_real_handoff_is_empty_after_it() -> None:
    ledger = CapacityLedger()
    p, c = ProducerLeases(), ConsumerLeases()
    ledger.apply(Side.PRODUCER, p.open("L", "req", 1, 100, 0.0).effects)
    offer = ReserveRequest("L", 1, "req", 1, 100)
    ledger.apply(Side.CONSUMER, c.reserve(offer, (4,), 50, 0.1).effects)
    ledger.apply(Side.PRODUCER, p.receive(Reserved("L", 1, (4,)), 0.2).effects)
    ledger.apply(Side.PRODUCER, p.hold("L", (0,), 100, 0.3).effects)
    assert ledger.snapshot().total_bytes == 150
    ledger.apply(Side.CONSUMER, c.receive(TransferPosted("L", 1, "L@1"), 0.4).effects)
    done = c.transfer_settled("L@1", TransferOutcome.COMPLETED, 0.5)
    ledger.apply(Side.CONSUMER, done.effects)
    assert ledger.snapshot().consumer.num_bytes == 0 and ledger.snapshot().producer.num_bytes == 100
    ledger.apply(Side.PRODUCER, p.receive(done.messages[0], 0.6).effects)
    assert ledger.snapshot().producer.num_bytes == 100  # send not settled yet: still held
    ledger.apply(Side.PRODUCER, p.transfer_settled("L@1", TransferOutcome.COMPLETED, 0.7).effects)
    snap = ledger.snapshot()
    assert snap.total_bytes == 0 and snap.peak_total_bytes == 150
