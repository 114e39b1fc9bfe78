"""Transient-capacity ledger: the pages and bytes that KV handoffs tie up, per side and lease.

A handoff costs memory twice for a while: the producer holds the prompt's KV from HELD until
its pages are actually freed (after commit, or a failure, once any transfer settled), and the
consumer holds its reservation from RESERVED until the pages are adopted by the decode request
or freed. A planner sizes pools with the peaks; an operator watches the totals.

The ledger learns only from lease effects (``HoldBlocks`` starts a holding, ``FreeBlocks`` /
``AdoptBlocks`` ends it), so it is correct exactly when the caller feeds it every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hetpd.ownership.effects import AdoptBlocks, Effect, FreeBlocks, HoldBlocks, LeaseKey, Side


@dataclass(frozen=True)
class Holding:
    blocks: int
    num_bytes: int


@dataclass(frozen=True)
class SideUsage:
    """One side's handoff holdings now, and the most it ever held at once."""

    blocks: int
    num_bytes: int
    peak_blocks: int
    peak_bytes: int
    leases: Mapping[LeaseKey, Holding]


@dataclass(frozen=True)
class LedgerSnapshot:
    producer: SideUsage
    consumer: SideUsage
    total_bytes: int  # both sides now
    peak_total_bytes: int  # the most both sides held at the same moment

    def side(self, side: Side) -> SideUsage:
        return self.producer if side is Side.PRODUCER else self.consumer


class _SideBook:
    def __init__(self) -> None:
        self.leases: dict[LeaseKey, Holding] = {}
        self.blocks = 0
        self.num_bytes = 0
        self.peak_blocks = 0
        self.peak_bytes = 0

    def hold(self, key: LeaseKey, blocks: int, num_bytes: int) -> None:
        if key in self.leases:
            raise ValueError(f"lease {key} already holds pages in the ledger (a HoldBlocks applied twice?)")
        self.leases[key] = Holding(blocks, num_bytes)
        self.blocks += blocks
        self.num_bytes += num_bytes
        self.peak_blocks = max(self.peak_blocks, self.blocks)
        self.peak_bytes = max(self.peak_bytes, self.num_bytes)

    def release(self, key: LeaseKey) -> None:
        holding = self.leases.pop(key, None)
        if holding is None:
            raise ValueError(f"lease {key} holds no pages in the ledger (an effect applied twice, or to the wrong side?)")
        self.blocks -= holding.blocks
        self.num_bytes -= holding.num_bytes

    def usage(self) -> SideUsage:
        return SideUsage(self.blocks, self.num_bytes, self.peak_blocks, self.peak_bytes, MappingProxyType(dict(self.leases)))


class CapacityLedger:
    """Books of both sides (a worker uses one side; a simulator may feed both)."""

    def __init__(self) -> None:
        self._books = {Side.PRODUCER: _SideBook(), Side.CONSUMER: _SideBook()}
        self._peak_total = 0

    def apply(self, side: Side, effects: Iterable[Effect]) -> None:
        """Book the holding effects of one step (or tick) taken on ``side``; others pass by."""
        book = self._books[side]
        for effect in effects:
            if isinstance(effect, HoldBlocks):
                book.hold(effect.lease, len(effect.block_ids), effect.num_bytes)
            elif isinstance(effect, AdoptBlocks) or (isinstance(effect, FreeBlocks) and not effect.refused):
                book.release(effect.lease)
        self._peak_total = max(self._peak_total, self._total())

    def reset(self, side: Side) -> None:
        """Forget one side's holdings (its worker restarted and its pool with it); peaks stay."""
        fresh = _SideBook()
        fresh.peak_blocks, fresh.peak_bytes = self._books[side].peak_blocks, self._books[side].peak_bytes
        self._books[side] = fresh

    def _total(self) -> int:
        return sum(book.num_bytes for book in self._books.values())

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(
            producer=self._books[Side.PRODUCER].usage(),
            consumer=self._books[Side.CONSUMER].usage(),
            total_bytes=self._total(),
            peak_total_bytes=self._peak_total,
        )
