"""What to do when a KV handoff attempt fails: a pure decision, named by the caller's policy.

* ``retry``: a new attempt (epoch + 1) on the same peer or another one, up to
  ``max_attempts`` attempts in all; then ``on_exhausted`` (recompute or fail).
* ``recompute``: the decode worker runs the prefill itself (decode engines accept prompts).
* ``fail``: give the client a clear error.

A client abort is never recovered: the client no longer wants the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

from hetpd.ownership.messages import FailureKind

_KINDS = ("retry", "recompute", "fail")
_PEER_CHOICES = ("same", "other")
_EXHAUSTED = ("recompute", "fail")


@dataclass(frozen=True)
class RecoveryPolicy:
    """``kind``: retry | recompute | fail. For retry: ``max_attempts`` (the first attempt counts),
    ``peer`` (same | other: another consumer, round-robin over the others) and ``on_exhausted``."""

    kind: Literal["retry", "recompute", "fail"] = "retry"
    max_attempts: int = 3
    peer: Literal["same", "other"] = "other"
    on_exhausted: Literal["recompute", "fail"] = "fail"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"RecoveryPolicy.kind must be one of {list(_KINDS)}, got {self.kind!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(
                f"RecoveryPolicy.max_attempts must be an integer >= 1 (1 means no retry; the first "
                f"attempt counts), got {self.max_attempts!r}"
            )
        if self.peer not in _PEER_CHOICES:
            raise ValueError(f"RecoveryPolicy.peer must be one of {list(_PEER_CHOICES)}, got {self.peer!r}")
        if self.on_exhausted not in _EXHAUSTED:
            raise ValueError(
                f"RecoveryPolicy.on_exhausted must be one of {list(_EXHAUSTED)} (what to do once retries "
                f"run out), got {self.on_exhausted!r}"
            )


@dataclass(frozen=True)
class Retry:
    """Open attempt ``attempt`` (use it as the lease epoch) with ``peer``."""

    peer: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class Recompute:
    """Run the prefill on the decode worker itself."""

    reason: str


@dataclass(frozen=True)
class Fail:
    """Tell the client the request failed, with ``message``."""

    message: str


RecoveryAction = Union[Retry, Recompute, Fail]


def decide(
    policy: RecoveryPolicy, failure: FailureKind, attempt: int, current_peer: str, peers: Sequence[str]
) -> RecoveryAction:
    """The action after attempt number ``attempt`` (from 1) with ``current_peer`` failed with
    ``failure``. ``peers``: the consumers a retry may use now (the current one may be absent if
    it is known to be down; then ``same`` cannot retry)."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be the failed attempt's number (>= 1), got {attempt!r}")
    what = f"KV handoff attempt {attempt} to {current_peer!r} failed ({failure.value})"
    if failure is FailureKind.CLIENT_ABORT:
        return Fail(f"request aborted by the client (attempt {attempt})")
    if policy.kind == "fail":
        return Fail(what)
    if policy.kind == "recompute":
        return Recompute(what)
    if attempt >= policy.max_attempts:
        return _exhausted(policy, f"{what}; {policy.max_attempts} attempts used")
    if policy.peer == "same":
        if current_peer not in peers:
            return _exhausted(policy, f"{what}; peer {current_peer!r} is not available for a retry")
        return Retry(current_peer, attempt + 1, what)
    others = [peer for peer in peers if peer != current_peer]
    if not others:
        return _exhausted(policy, f"{what}; no other peer to retry with")
    # Round-robin by attempt number spreads repeated retries over the other peers.
    return Retry(others[(attempt - 1) % len(others)], attempt + 1, what)


def _exhausted(policy: RecoveryPolicy, why: str) -> RecoveryAction:
    if policy.on_exhausted == "recompute":
        return Recompute(why)
    return Fail(why)
