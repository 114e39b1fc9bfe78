"""Recovery decisions and policy validation."""

from __future__ import annotations

from typing import Any

import pytest

from hetpd.ownership import Fail, FailureKind, Recompute, RecoveryPolicy, Retry, decide

PEERS = ["d0", "d1", "d2"]


def test_retry_other_peer_round_robins_until_attempts_run_out() -> None:
    policy = RecoveryPolicy("retry", max_attempts=3, peer="other")
    first = decide(policy, FailureKind.CHECKSUM, 1, "d0", PEERS)
    assert first == Retry("d1", 2, first.reason) and "checksum" in first.reason
    second = decide(policy, FailureKind.REFUSED, 2, "d1", PEERS)
    assert isinstance(second, Retry) and second.peer == "d2" and second.attempt == 3
    third = decide(policy, FailureKind.EXPIRED, 3, "d2", PEERS)
    assert isinstance(third, Fail) and "3 attempts used" in third.message


def test_retry_same_peer() -> None:
    policy = RecoveryPolicy("retry", max_attempts=2, peer="same")
    assert decide(policy, FailureKind.TRANSFER_CANCELLED, 1, "d1", PEERS) == Retry(
        "d1", 2, "KV handoff attempt 1 to 'd1' failed (transfer_cancelled)"
    )
    # The same peer is gone: nothing to retry on, so the exhausted branch decides.
    gone = decide(policy, FailureKind.PEER_UNKNOWN, 1, "d9", PEERS)
    assert isinstance(gone, Fail) and "not available" in gone.message


def test_exhausted_retries_can_recompute() -> None:
    policy = RecoveryPolicy("retry", max_attempts=1, on_exhausted="recompute")
    action = decide(policy, FailureKind.EXPIRED, 1, "d0", PEERS)
    assert isinstance(action, Recompute) and "1 attempts used" in action.reason
    lonely = decide(RecoveryPolicy("retry", on_exhausted="recompute"), FailureKind.REFUSED, 1, "d0", ["d0"])
    assert isinstance(lonely, Recompute) and "no other peer" in lonely.reason


def test_recompute_and_fail_policies() -> None:
    assert isinstance(decide(RecoveryPolicy("recompute"), FailureKind.CHECKSUM, 1, "d0", PEERS), Recompute)
    failed = decide(RecoveryPolicy("fail"), FailureKind.CHECKSUM, 1, "d0", PEERS)
    assert failed == Fail("KV handoff attempt 1 to 'd0' failed (checksum)")


def test_client_abort_is_never_recovered() -> None:
    for policy in (RecoveryPolicy("retry"), RecoveryPolicy("recompute"), RecoveryPolicy("fail")):
        action = decide(policy, FailureKind.CLIENT_ABORT, 1, "d0", PEERS)
        assert isinstance(action, Fail) and "aborted by the client" in action.message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "pray"}, "RecoveryPolicy.kind must be one of"),
        ({"max_attempts": 0}, r"RecoveryPolicy.max_attempts must be an integer >= 1 \(1 means no retry"),
        ({"max_attempts": True}, "RecoveryPolicy.max_attempts"),
        ({"peer": "any"}, "RecoveryPolicy.peer must be one of"),
        ({"on_exhausted": "retry"}, "RecoveryPolicy.on_exhausted must be one of"),
    ],
)
def test_bad_policy_values_name_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RecoveryPolicy(**kwargs)


def test_bad_attempt_number() -> None:
    with pytest.raises(ValueError, match="attempt must be the failed attempt's number"):
        decide(RecoveryPolicy(), FailureKind.CHECKSUM, 0, "d0", PEERS)
