"""NIXL transport (only where the ``nixl`` package imports): the shared cross-process scenarios."""

from __future__ import annotations

import pytest
from transfer import harness

pytest.importorskip("nixl._api", reason="nixl is not installed (pip install nixl==1.5.1)")

from hetpd.transfer.nixl import NixlReceiver, NixlSender  # noqa: E402

BACKEND = "nixl"


@pytest.mark.timeout(60)
def test_round_trip_many_spans_in_several_posts() -> None:
    harness.round_trip_many_spans(BACKEND)


@pytest.mark.timeout(60)
def test_checksum_mismatch_fails_and_names_the_span() -> None:
    harness.checksum_mismatch_fails(BACKEND)


@pytest.mark.timeout(60)
def test_cancel_drops_late_data() -> None:
    harness.cancel_drops_late_data(BACKEND)


@pytest.mark.timeout(60)
def test_sender_killed_mid_transfer_fails_promptly() -> None:
    harness.sender_killed_fails_promptly(BACKEND)


@pytest.mark.timeout(60)
def test_receiver_killed_mid_transfer_fails_promptly() -> None:
    harness.receiver_killed_fails_promptly(BACKEND)


@pytest.mark.timeout(30)
def test_bad_input_raises_and_changes_nothing() -> None:
    with NixlReceiver() as receiver, NixlSender() as sender:
        harness.out_of_bounds_raises(sender, receiver)
