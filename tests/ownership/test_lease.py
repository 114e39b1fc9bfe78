"""Every lease transition, driven by hand: the happy path, duplicates, late and stale
messages, aborts, checksum failure, expiry and heartbeats, and the tables' bookkeeping."""

from __future__ import annotations

import pytest

from hetpd.ownership import (
    Abort,
    AdoptBlocks,
    Admit,
    CancelTransfer,
    Committed,
    ConsumerLeases,
    Ended,
    Expired,
    FailureKind,
    FreeBlocks,
    Heartbeat,
    HoldBlocks,
    LeaseConfig,
    LeaseKey,
    LeaseState,
    Outcome,
    ProducerLeases,
    Refused,
    ReleaseAck,
    Reserved,
    ReserveRequest,
    Send,
    StartTransfer,
    Step,
    TransferOutcome,
    TransferPosted,
)

CONFIG = LeaseConfig(ttl=10.0, heartbeat_interval=2.0, retain=30.0)
KEY = LeaseKey("L", 1)
TID = "L@1"


def effects_of(step: Step, kind: type) -> list[object]:
    return [e for e in step.effects if isinstance(e, kind)]


class Pair:
    """A producer table and a consumer table, with the happy path one call per stage."""

    def __init__(self) -> None:
        self.p = ProducerLeases(CONFIG)
        self.c = ConsumerLeases(CONFIG)
        self.offer: ReserveRequest | None = None

    def open(self, now: float = 0.0) -> Step:
        step = self.p.open("L", "req", 2, 2000, now)
        assert step.messages == (ReserveRequest("L", 1, "req", 2, 2000),)
        return step

    def admit(self, now: float = 0.1) -> Step:
        self.open()
        step = self.c.receive(ReserveRequest("L", 1, "req", 2, 2000), now)
        [admit] = step.effects
        assert isinstance(admit, Admit)
        self.offer = admit.offer
        return self.c.reserve(admit.offer, (7, 8), 1000, now)

    def reserved(self, now: float = 0.2) -> Step:
        self.admit()
        return self.p.receive(Reserved("L", 1, (7, 8)), now)

    def sending(self, now: float = 0.3) -> Step:
        self.reserved()
        return self.p.hold("L", (1, 2), 2000, now)

    def receiving(self, now: float = 0.4) -> Step:
        self.sending()
        return self.c.receive(TransferPosted("L", 1, TID), now)

    def committed(self, now: float = 0.5) -> Step:
        self.receiving()
        return self.c.transfer_settled(TID, TransferOutcome.COMPLETED, now)

    def state(self) -> tuple[LeaseState | None, LeaseState | None]:
        p, c = self.p.get("L"), self.c.get("L")
        return (p.state if p else None, c.state if c else None)


# ---------------------------------------------------------------------- happy path
def test_happy_path_moves_ownership_in_order() -> None:
    opened = Pair()
    opened.open()
    assert opened.state() == (LeaseState.COMPUTING, None)

    pair = Pair()
    step = pair.admit()
    assert step.effects == (HoldBlocks(KEY, (7, 8), 1000), Send(Reserved("L", 1, (7, 8))))
    assert pair.state() == (LeaseState.COMPUTING, LeaseState.RESERVED)

    # The reservation arrives before prefill is done: nothing moves yet.
    assert pair.p.receive(Reserved("L", 1, (7, 8)), 0.2) == Step(Outcome.APPLIED)
    step = pair.p.hold("L", (1, 2), 2000, 0.3)
    assert step.effects == (
        HoldBlocks(KEY, (1, 2), 2000),
        StartTransfer(TID, KEY, "send", (1, 2), (7, 8)),
        Send(TransferPosted("L", 1, TID)),
    )
    assert pair.state() == (LeaseState.SENDING, LeaseState.RESERVED)

    step = pair.c.receive(TransferPosted("L", 1, TID), 0.4)
    assert step.effects == (StartTransfer(TID, KEY, "receive", (7, 8), ()),)
    assert pair.state() == (LeaseState.SENDING, LeaseState.RECEIVING)

    step = pair.c.transfer_settled(TID, TransferOutcome.COMPLETED, 0.5)
    assert effects_of(step, AdoptBlocks) == [AdoptBlocks(KEY, "req", (7, 8), 1000)]
    assert step.messages == (Committed("L", 1),)
    assert pair.state() == (LeaseState.SENDING, LeaseState.COMMITTED)

    # Committed arrives before the producer's own send settled: released, pages quarantined.
    step = pair.p.receive(Committed("L", 1), 0.6)
    assert step.messages == (ReleaseAck("L", 1),) and not effects_of(step, FreeBlocks)
    assert pair.state() == (LeaseState.RELEASED, LeaseState.COMMITTED)
    assert pair.p.holdings() == {KEY: (1, 2)}
    step = pair.p.transfer_settled(TID, TransferOutcome.COMPLETED, 0.7)
    assert step.effects == (FreeBlocks(KEY, (1, 2), 2000),)
    assert pair.p.holdings() == {} and pair.p.live() == 0 and pair.c.live() == 0

    assert pair.c.receive(ReleaseAck("L", 1), 0.8).outcome is Outcome.APPLIED


def test_hold_before_reservation_waits_then_sends_on_reserved() -> None:
    pair = Pair()
    pair.admit()
    assert pair.p.hold("L", (1, 2), 2000, 0.2).effects == (HoldBlocks(KEY, (1, 2), 2000),)
    assert pair.state()[0] is LeaseState.HELD
    step = pair.p.receive(Reserved("L", 1, (7, 8)), 0.3)
    assert effects_of(step, StartTransfer) and pair.state()[0] is LeaseState.SENDING


def test_send_completing_first_keeps_pages_until_commit() -> None:
    pair = Pair()
    pair.sending()
    assert pair.p.transfer_settled(TID, TransferOutcome.COMPLETED, 0.4).effects == ()
    assert pair.p.holdings() == {KEY: (1, 2)} and pair.state()[0] is LeaseState.SENDING
    step = pair.p.receive(Committed("L", 1), 0.5)
    assert effects_of(step, FreeBlocks) == [FreeBlocks(KEY, (1, 2), 2000)]


# ---------------------------------------------------------------------- duplicates
def test_duplicate_commit_and_release_ack_are_no_ops() -> None:
    pair = Pair()
    pair.committed()
    pair.p.transfer_settled(TID, TransferOutcome.COMPLETED, 0.5)
    first = pair.p.receive(Committed("L", 1), 0.6)
    assert effects_of(first, FreeBlocks)
    again = pair.p.receive(Committed("L", 1), 0.7)
    assert again.outcome is Outcome.DUPLICATE and again.effects == (Send(ReleaseAck("L", 1)),)
    assert pair.c.receive(ReleaseAck("L", 1), 0.8).outcome is Outcome.APPLIED
    assert pair.c.receive(ReleaseAck("L", 1), 0.9).outcome is Outcome.DUPLICATE


def test_duplicate_offer_reserved_and_posted() -> None:
    pair = Pair()
    pair.receiving()
    again = pair.c.receive(ReserveRequest("L", 1, "req", 2, 2000), 0.5)
    assert again.outcome is Outcome.DUPLICATE and again.messages == (Reserved("L", 1, (7, 8)),)
    assert pair.p.receive(Reserved("L", 1, (7, 8)), 0.5).outcome is Outcome.DUPLICATE
    assert pair.c.receive(TransferPosted("L", 1, TID), 0.5).outcome is Outcome.DUPLICATE


def test_second_reserve_for_one_offer_hands_pages_back() -> None:
    pair = Pair()
    pair.admit()
    assert pair.offer is not None
    step = pair.c.reserve(pair.offer, (3,), 500, 0.2)
    assert step.outcome is Outcome.IGNORED
    assert step.effects == (FreeBlocks(KEY, (3,), 500, refused=True),)
    assert pair.c.holdings() == {KEY: (7, 8)}


def test_repeated_transfer_report_is_ignored() -> None:
    pair = Pair()
    pair.committed()
    late = pair.c.transfer_settled(TID, TransferOutcome.COMPLETED, 0.6)
    assert late.outcome is Outcome.IGNORED and late.effects == ()


# ---------------------------------------------------------------------- aborts
def test_abort_before_admission_releases_everything() -> None:
    pair = Pair()
    pair.open()
    step = pair.p.abort("L", 0.1)
    assert step.messages == (Abort("L", 1, FailureKind.CLIENT_ABORT, "aborted by the client"),)
    assert pair.state() == (LeaseState.ABORTED, None)
    # The abort overtakes the offer: the consumer remembers, and never admits the late offer.
    assert pair.c.receive(step.messages[0], 0.2).effects == ()
    late = pair.c.receive(ReserveRequest("L", 1, "req", 2, 2000), 0.3)
    assert late.outcome is Outcome.IGNORED and not effects_of(late, Admit)
    # Prefill finishes anyway: the ended lease hands the pages straight back.
    hold = pair.p.hold("L", (1, 2), 2000, 0.4)
    assert hold.outcome is Outcome.IGNORED and hold.effects == (FreeBlocks(KEY, (1, 2), 2000, refused=True),)
    assert pair.p.abort("L", 0.5).outcome is Outcome.DUPLICATE


def test_abort_after_reservation_frees_the_consumer_pages() -> None:
    pair = Pair()
    pair.admit()
    step = pair.c.receive(Abort("L", 1, FailureKind.CLIENT_ABORT, "bye"), 0.2)
    assert effects_of(step, FreeBlocks) == [FreeBlocks(KEY, (7, 8), 1000)]
    assert pair.state()[1] is LeaseState.ABORTED


def test_abort_mid_transfer_quarantines_until_settled_on_both_sides() -> None:
    pair = Pair()
    pair.receiving()
    step = pair.p.abort("L", 1.0)
    assert effects_of(step, CancelTransfer) == [CancelTransfer(TID, KEY)] and not effects_of(step, FreeBlocks)
    assert pair.p.get("L").quarantined and pair.p.holdings() == {KEY: (1, 2)}  # type: ignore[union-attr]

    step = pair.c.receive(step.messages[0], 1.1)
    assert effects_of(step, CancelTransfer) == [CancelTransfer(TID, KEY)] and not effects_of(step, FreeBlocks)
    assert pair.state() == (LeaseState.ABORTED, LeaseState.ABORTED)
    assert pair.c.holdings() == {KEY: (7, 8)} and pair.c.in_flight() == {TID: KEY}

    # The cancel lost the race and the receive completed: still freed, never adopted.
    step = pair.c.transfer_settled(TID, TransferOutcome.COMPLETED, 1.2)
    assert step.effects == (FreeBlocks(KEY, (7, 8), 1000),)
    step = pair.p.transfer_settled(TID, TransferOutcome.CANCELLED, 1.3)
    assert step.effects == (FreeBlocks(KEY, (1, 2), 2000),)
    assert not pair.p.holdings() and not pair.c.holdings() and not pair.c.in_flight()


def test_consumer_abort_after_commit_is_not_the_leases_business() -> None:
    pair = Pair()
    pair.committed()
    assert pair.c.abort("L", 1.0).outcome is Outcome.IGNORED
    late = pair.c.receive(Abort("L", 1, FailureKind.EXPIRED, "late"), 1.0)
    assert late.outcome is Outcome.IGNORED and pair.state()[1] is LeaseState.COMMITTED


# ---------------------------------------------------------------------- failures
def test_checksum_failure_fails_both_sides_and_commits_nothing() -> None:
    pair = Pair()
    pair.receiving()
    step = pair.c.transfer_settled(TID, TransferOutcome.CHECKSUM_FAILED, 1.0)
    assert not effects_of(step, AdoptBlocks)
    assert effects_of(step, FreeBlocks) == [FreeBlocks(KEY, (7, 8), 1000)]
    [notice] = step.messages
    assert isinstance(notice, Abort) and notice.failure is FailureKind.CHECKSUM
    [ended] = effects_of(step, Ended)
    assert isinstance(ended, Ended) and ended.state is LeaseState.FAILED and ended.failure is FailureKind.CHECKSUM

    step = pair.p.receive(notice, 1.1)
    assert effects_of(step, CancelTransfer) and pair.state()[0] is LeaseState.FAILED
    assert pair.p.transfer_settled(TID, TransferOutcome.COMPLETED, 1.2).effects == (FreeBlocks(KEY, (1, 2), 2000),)


def test_refusal_fails_the_producer_and_frees_held_pages() -> None:
    pair = Pair()
    pair.open()
    pair.p.hold("L", (1, 2), 2000, 0.1)
    offer = ReserveRequest("L", 1, "req", 2, 2000)
    step = pair.c.refuse(offer, "needs 2 KV pages, 0 free", 0.2)
    assert step.messages == (Refused("L", 1, "needs 2 KV pages, 0 free"),)
    assert pair.c.receive(offer, 0.3).messages == step.messages  # a repeated offer gets the same answer
    failed = pair.p.receive(step.messages[0], 0.4)
    assert effects_of(failed, FreeBlocks) == [FreeBlocks(KEY, (1, 2), 2000)]
    assert pair.state()[0] is LeaseState.FAILED


def test_failed_send_ends_the_producer_lease() -> None:
    pair = Pair()
    pair.receiving()
    step = pair.p.transfer_settled(TID, TransferOutcome.CANCELLED, 1.0)
    assert effects_of(step, FreeBlocks) and pair.state()[0] is LeaseState.FAILED
    [notice] = step.messages
    assert isinstance(notice, Abort) and notice.failure is FailureKind.TRANSFER_CANCELLED


# ---------------------------------------------------------------------- time
def test_expiry_without_heartbeat_frees_the_reservation() -> None:
    pair = Pair()
    pair.admit(now=0.0)
    assert pair.c.tick(9.9).expired == ()
    tick = pair.c.tick(10.0)
    assert tick.expired == (KEY,)
    assert [e for e in tick.effects if isinstance(e, FreeBlocks)] == [FreeBlocks(KEY, (7, 8), 1000)]
    assert any(isinstance(e, Send) and isinstance(e.message, Expired) for e in tick.effects)
    assert pair.state()[1] is LeaseState.EXPIRED
    # The producer hears of it and gives up too.
    step = pair.p.receive(Expired("L", 1, "no word"), 10.1)
    assert pair.state()[0] is LeaseState.EXPIRED and step.outcome is Outcome.APPLIED


def test_heartbeats_keep_a_lease_alive_past_its_ttl() -> None:
    pair = Pair()
    pair.admit(now=0.0)
    for now in (4.0, 8.0, 12.0, 16.0):
        assert pair.c.receive(Heartbeat("L", 1), now).outcome is Outcome.APPLIED
        assert pair.c.tick(now + 5.0).expired == ()
    assert pair.state()[1] is LeaseState.RESERVED
    assert pair.c.tick(26.0).expired == (KEY,)


def test_renewal_by_a_voucher_keeps_live_leases_and_leaves_ended_ones() -> None:
    pair = Pair()
    pair.admit(now=0.0)
    # The producer's engine is busy (no message for 25 s) but its process is vouched for.
    for now in (6.0, 12.0, 18.0):
        assert pair.c.renew(["L", "unknown"], now) == 1
        assert pair.c.tick(now + 5.0).expired == ()
    assert pair.c.tick(28.0).expired == (KEY,)  # vouching stopped: the ttl runs out as usual
    assert pair.c.renew(["L"], 29.0) == 0  # an ended lease is never revived


def test_tick_sends_keepalives_and_re_offers_until_answered() -> None:
    pair = Pair()
    pair.open(now=0.0)
    assert pair.p.tick(1.0).effects == ()
    assert [e.message for e in pair.p.tick(2.0).effects if isinstance(e, Send)] == [ReserveRequest("L", 1, "req", 2, 2000)]
    pair.c.receive(ReserveRequest("L", 1, "req", 2, 2000), 2.1)
    pair.c.reserve(ReserveRequest("L", 1, "req", 2, 2000), (7,), 500, 2.1)
    pair.p.receive(Reserved("L", 1, (7,)), 2.2)
    assert [e.message for e in pair.p.tick(4.0).effects if isinstance(e, Send)] == [Heartbeat("L", 1)]
    assert [e.message for e in pair.c.tick(4.2).effects if isinstance(e, Send)] == [Heartbeat("L", 1)]


def test_late_transfer_done_after_expiry_frees_never_commits() -> None:
    pair = Pair()
    pair.receiving()
    tick = pair.c.tick(50.0)
    assert tick.expired == (KEY,)
    assert any(isinstance(e, CancelTransfer) for e in tick.effects)
    assert not any(isinstance(e, FreeBlocks) for e in tick.effects)  # quarantined: a write may land
    step = pair.c.transfer_settled(TID, TransferOutcome.COMPLETED, 51.0)
    assert step.effects == (FreeBlocks(KEY, (7, 8), 1000),)
    assert pair.state()[1] is LeaseState.EXPIRED
    # A producer message about it now is answered with the expiry again, never a crash.
    late = pair.c.receive(TransferPosted("L", 1, TID), 52.0)
    assert late.outcome is Outcome.IGNORED and isinstance(late.messages[0], Expired)


def test_committed_consumer_resends_commit_until_acknowledged() -> None:
    pair = Pair()
    pair.committed(now=1.0)
    resent = [e.message for e in pair.c.tick(3.0).effects if isinstance(e, Send)]
    assert resent == [Committed("L", 1)]
    pair.c.receive(ReleaseAck("L", 1), 3.5)
    assert pair.c.tick(6.0).effects == ()


def test_finished_leases_are_forgotten_after_retain() -> None:
    pair = Pair()
    pair.admit(now=0.0)
    pair.c.abort("L", 1.0)
    assert pair.c.tick(30.0).pruned == 0
    assert pair.c.tick(31.0).pruned == 1 and pair.c.get("L") is None


# ---------------------------------------------------------------------- unknown, stale, superseded
def test_messages_about_unknown_leases_get_an_abort_never_a_crash() -> None:
    p, c = ProducerLeases(CONFIG), ConsumerLeases(CONFIG)
    for message in (Reserved("X", 1, (1,)), Heartbeat("X", 1), Committed("X", 1)):
        step = p.receive(message, 0.0)
        assert step.outcome is Outcome.IGNORED
        [answer] = step.messages
        assert isinstance(answer, Abort) and answer.failure is FailureKind.PEER_UNKNOWN
    for message in (Heartbeat("X", 1), TransferPosted("X", 1, "X@1")):
        [answer] = c.receive(message, 0.0).messages
        assert isinstance(answer, Abort) and answer.failure is FailureKind.PEER_UNKNOWN
    # Failure notices are never answered (no ping-pong), and wrong-way messages are ignored.
    assert p.receive(Abort("X", 1, FailureKind.PEER_UNKNOWN), 0.0).effects == ()
    assert p.receive(ReserveRequest("X", 1, "r", 1, 1), 0.0).outcome is Outcome.IGNORED
    assert c.receive(Committed("X", 1), 0.0).outcome is Outcome.IGNORED
    assert p.transfer_settled("nope", TransferOutcome.COMPLETED, 0.0).outcome is Outcome.IGNORED
    assert p.abort("nope", 0.0).outcome is Outcome.IGNORED


def test_stale_epoch_is_ignored_and_new_epoch_supersedes() -> None:
    pair = Pair()
    pair.admit(now=0.0)
    offer2 = ReserveRequest("L", 2, "req", 2, 2000)
    step = pair.c.receive(offer2, 1.0)
    frees = effects_of(step, FreeBlocks)
    assert frees == [FreeBlocks(KEY, (7, 8), 1000)] and effects_of(step, Admit) == [Admit(offer2)]
    pair.c.reserve(offer2, (3, 4), 1000, 1.0)
    stale = pair.c.receive(TransferPosted("L", 1, TID), 1.1)
    assert stale.outcome is Outcome.IGNORED or stale.effects == ()
    assert pair.c.get("L").key == LeaseKey("L", 2)  # type: ignore[union-attr]
    assert pair.c.reserve(ReserveRequest("L", 1, "req", 2, 2000), (5,), 1, 1.2).effects == (
        FreeBlocks(KEY, (5,), 1, refused=True),
    )


def test_retry_opens_a_new_epoch_only_after_the_old_one_ended() -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(ValueError, match="still live"):
        pair.p.open("L", "req", 2, 2000, 1.0, epoch=2)
    with pytest.raises(ValueError, match="use a higher epoch"):
        pair.p.open("L", "req", 2, 2000, 1.0, epoch=1)
    pair.p.abort("L", 1.0)
    assert pair.p.open("L", "req", 2, 2000, 1.0, epoch=2).messages == (ReserveRequest("L", 2, "req", 2, 2000),)
    assert pair.p.receive(Reserved("L", 1, (7,)), 1.1).outcome is Outcome.IGNORED  # attempt 1 is over


def test_hold_twice_is_a_caller_bug() -> None:
    pair = Pair()
    pair.sending()
    with pytest.raises(ValueError, match="hold\\(\\) once per lease"):
        pair.p.hold("L", (3,), 1, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl": 0}, "LeaseConfig.ttl must be > 0"),
        ({"ttl": 5, "heartbeat_interval": 5}, "LeaseConfig.heartbeat_interval must be > 0 and below ttl=5"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"retain": -1}, "LeaseConfig.retain must be >= 0"),
    ],
)
def test_bad_lease_config(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LeaseConfig(**kwargs)
