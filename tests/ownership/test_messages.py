"""Protocol messages: JSON round trip, and a peer's malformed bytes are refused by name."""

from __future__ import annotations

import json

import pytest

from hetpd.ownership import (
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

ALL: list[Message] = [
    ReserveRequest("L", 1, "req-1", 3, 3000),
    Reserved("L", 1, (4, 5, 6)),
    Refused("L", 2, "needs 3 KV pages, 1 free"),
    TransferPosted("L", 1, "L@1"),
    Committed("L", 1),
    ReleaseAck("L", 1),
    Abort("L", 1, FailureKind.CHECKSUM, "receive checksum_failed"),
    Expired("L", 1, "no word for 10s"),
    Heartbeat("L", 7),
]


@pytest.mark.parametrize("message", ALL, ids=lambda m: m.TYPE)
def test_json_round_trip(message: Message) -> None:
    wire = json.dumps(message.to_dict())
    raw = json.loads(wire)
    assert raw["type"] == message.TYPE and raw["lease_id"] == "L"
    assert message_from_dict(raw) == message
    assert type(message).from_dict(raw) == message
    assert message_to_dict(message) == message.to_dict()


def test_every_type_tag_is_distinct() -> None:
    assert len({m.TYPE for m in ALL}) == len(ALL)


def test_unknown_type_is_named() -> None:
    with pytest.raises(ValueError, match="unknown message type 'teleport'"):
        message_from_dict({"type": "teleport", "lease_id": "L", "epoch": 1})
    with pytest.raises(ValueError, match="unknown message type None"):
        message_from_dict({"lease_id": "L", "epoch": 1})


def test_malformed_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="lacks field 'epoch'"):
        message_from_dict({"type": "committed", "lease_id": "L"})
    with pytest.raises(ValueError, match=r"unknown fields \['extra'\]"):
        message_from_dict({"type": "committed", "lease_id": "L", "epoch": 1, "extra": 0})
    with pytest.raises(ValueError, match="committed.epoch must be an integer"):
        message_from_dict({"type": "committed", "lease_id": "L", "epoch": True})
    with pytest.raises(ValueError, match="epoch must be an integer >= 1"):
        message_from_dict({"type": "committed", "lease_id": "L", "epoch": 0})
    with pytest.raises(ValueError, match="reserved.block_ids must be a list of non-negative integers"):
        message_from_dict({"type": "reserved", "lease_id": "L", "epoch": 1, "block_ids": [1, "2"]})
    with pytest.raises(ValueError, match="abort.failure must be one of"):
        message_from_dict({"type": "abort", "lease_id": "L", "epoch": 1, "failure": "gremlins"})
    with pytest.raises(ValueError, match="heartbeat.lease_id must be a string"):
        message_from_dict({"type": "heartbeat", "lease_id": 3, "epoch": 1})


def test_optional_fields_default_and_class_mismatch_is_refused() -> None:
    assert message_from_dict({"type": "expired", "lease_id": "L", "epoch": 2}) == Expired("L", 2)
    with pytest.raises(ValueError, match="expected a committed message, got heartbeat"):
        Committed.from_dict(Heartbeat("L", 1).to_dict())
