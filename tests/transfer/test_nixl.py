"""NIXL transport (only where the ``nixl`` package imports): what is NIXL's own (the shared scenarios are in test_scenarios.py)."""

from __future__ import annotations

import pytest
from transfer import harness

pytest.importorskip("nixl._api", reason="nixl is not installed (pip install nixl==1.5.1)")

from hetpd.transfer.nixl import NixlReceiver, NixlSender  # noqa: E402

@pytest.mark.timeout(30)
def test_bad_input_raises_and_changes_nothing() -> None:
    with NixlReceiver() as receiver, NixlSender() as sender:
        harness.out_of_bounds_raises(sender, receiver)
