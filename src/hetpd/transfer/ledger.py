"""Bookkeeping of live transfers, shared by every backend and both sides. Pure Python.

Each live transfer has one :class:`TransferRecord`. Invariants:

* a record's ``result`` goes from None to a final result exactly once, and only while its
  ``write_lock`` is held; whoever writes payload into a region holds the same lock and checks
  ``result is None`` first. So after :meth:`Ledger.cancel` (which takes the lock) returns, no
  write of that transfer is running or will start: the receiver's key guarantee;
* a final result is delivered exactly once (``wait``, ``poll`` or ``cancel``), and the record
  is dropped at that moment, so the ledger's size is bounded by the transfers in flight (plus
  the last ``RECENT`` delivered results, kept to answer a late peer precisely).

Lock order: a record's ``write_lock`` before the ledger's condition lock, never the reverse.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from hetpd.transfer.auth import TransferAuth
from hetpd.transfer.base import TransferResult, TransferStatus

RECENT = 4096


class TransferRecord:
    """One live transfer (mutable, internal). ``peer`` is the connection it is bound to;
    ``auth`` its derived tags and MAC key (None without a key); ``expected_nbytes`` what the
    receiver's ``expect`` said must land before a final post counts (None: not checked)."""

    __slots__ = ("transfer_id", "region", "source", "peer", "nbytes", "result", "final_posted", "write_lock",
                 "auth", "expected_nbytes")

    def __init__(self, transfer_id: str, region: str, auth: TransferAuth | None = None,
                 expected_nbytes: int | None = None) -> None:
        self.transfer_id = transfer_id
        self.region = region
        self.source = ""  # sender side: the source region posted from
        self.peer: Hashable | None = None
        self.nbytes = 0
        self.result: TransferResult | None = None
        self.final_posted = False
        self.write_lock = threading.Lock()
        self.auth = auth
        self.expected_nbytes = expected_nbytes


class Ledger:
    """Live transfers of one sender or receiver, keyed by transfer id."""

    def __init__(self, on_end: Callable[[TransferRecord], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._records: dict[str, TransferRecord] = {}
        self._ended: list[str] = []  # ids whose result is set but not yet delivered, in order
        self._on_end = on_end  # e.g. tell the peer; called outside the ledger lock
        self._recent: OrderedDict[str, TransferResult] = OrderedDict()  # delivered, newest last

    # ------------------------------------------------------------------ lookup
    def add(self, transfer_id: str, region: str, auth: TransferAuth | None = None,
            expected_nbytes: int | None = None) -> TransferRecord:
        """A new live record, complete before any other thread can see it."""
        with self._cond:
            if transfer_id in self._records:
                raise ValueError(f"transfer_id {transfer_id!r} is already live; wait for or cancel it first")
            record = TransferRecord(transfer_id, region, auth, expected_nbytes)
            self._records[transfer_id] = record
            return record

    def get(self, transfer_id: str) -> TransferRecord | None:
        """The live (or ended, undelivered) record, or None."""
        with self._cond:
            return self._records.get(transfer_id)

    def require(self, transfer_id: str, hint: str) -> TransferRecord:
        record = self.get(transfer_id)
        if record is None:
            raise ValueError(f"unknown transfer_id {transfer_id!r}: {hint}")
        return record

    def recent(self, transfer_id: str) -> TransferResult | None:
        """The delivered result of a recently ended transfer, if still remembered."""
        with self._cond:
            return self._recent.get(transfer_id)

    def records(self) -> list[TransferRecord]:
        with self._cond:
            return list(self._records.values())

    # ------------------------------------------------------------------ ending
    def end_locked(self, record: TransferRecord, status: TransferStatus, error: str | None = None) -> bool:
        """Set the final result; the caller holds ``record.write_lock``. False if already ended."""
        if record.result is not None:
            return False
        record.result = TransferResult(record.transfer_id, status, record.nbytes,
                                       None if status is TransferStatus.OK else error or status.value)
        with self._cond:
            if self._records.get(record.transfer_id) is record:
                self._ended.append(record.transfer_id)
            self._cond.notify_all()
        if self._on_end is not None:
            self._on_end(record)
        return True

    def end(self, record: TransferRecord, status: TransferStatus, error: str | None = None) -> bool:
        """Like :meth:`end_locked`, taking the write lock (waits for a write in progress)."""
        with record.write_lock:
            return self.end_locked(record, status, error)

    def end_where(self, matches: Callable[[TransferRecord], bool], status: TransferStatus, error: str) -> None:
        """End every live record that ``matches`` (a lost peer, close)."""
        for record in self.records():
            if record.result is None and matches(record):
                self.end(record, status, error)

    # ------------------------------------------------------------------ delivery
    def wait(self, transfer_id: str, timeout: float, hint: str) -> TransferResult:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            record = self._records.get(transfer_id)
            if record is None:
                raise ValueError(f"unknown transfer_id {transfer_id!r}: {hint}")
            while record.result is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return TransferResult(transfer_id, TransferStatus.TIMED_OUT, record.nbytes,
                                          f"transfer {transfer_id!r} still in flight after {timeout:g} s")
                self._cond.wait(left)
            return self._deliver(record)

    def poll(self) -> list[TransferResult]:
        with self._cond:
            ready = [self._records[tid] for tid in self._ended if tid in self._records]
            return [self._deliver(record) for record in ready]

    def cancel(self, transfer_id: str, hint: str) -> tuple[TransferResult, bool]:
        """End the transfer CANCELLED unless it already ended; deliver its result. The flag says
        whether this call did the cancelling (so the caller tells the peer)."""
        record = self.require(transfer_id, hint)
        cancelled = self.end(record, TransferStatus.CANCELLED, f"transfer {transfer_id!r} cancelled")
        with self._cond:
            assert record.result is not None
            if self._records.get(transfer_id) is not record:  # delivered meanwhile by a wait/poll
                return record.result, cancelled
            return self._deliver(record), cancelled

    def _deliver(self, record: TransferRecord) -> TransferResult:
        # Caller holds self._cond.
        assert record.result is not None
        del self._records[record.transfer_id]
        if record.transfer_id in self._ended:
            self._ended.remove(record.transfer_id)
        self._recent[record.transfer_id] = record.result
        self._recent.move_to_end(record.transfer_id)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        return record.result
