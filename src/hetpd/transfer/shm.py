"""Shared-memory transport between processes on one host (Linux ``/dev/shm``): pull.

The sender owns POSIX shared-memory segments (files under ``/dev/shm`` named
``hetpd-kv-<pid>-<random>``) holding its source bytes; the receiver maps them read-only and
its own process copies posted pieces into its region (see ``pull`` for the control protocol).
The receiver can never write into the sender's memory, and the sender never touches the
receiver's.

* :meth:`ShmSender.allocate_region` returns a view of a fresh segment: a producer writing its
  KV there is sent with one copy in total (the receiver's).
* :meth:`ShmSender.register_region` takes any buffer; each post first stages its spans into a
  segment of the same size (one extra copy), so the receiver still only reads shared memory.

Segments are unlinked when the sender closes. A sender killed before closing leaves its
segments behind; :func:`remove_orphan_segments` unlinks those whose creator is dead.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from typing import Any

from hetpd.transfer.auth import HANDSHAKE_TIMEOUT_S
from hetpd.transfer.base import Buffer, FaultInjection, RegionDescriptor, Span, check_name, writable_view
from hetpd.transfer.checksum import PIECE_BYTES, Hasher, copy_and_digest
from hetpd.transfer.net import MAX_CONNS, MAX_CONNS_PER_PEER, Conn
from hetpd.transfer.pull import PullReceiver, PullSender

BACKEND = "shm"
SHM_DIR = "/dev/shm"
_PREFIX = "hetpd-kv-"
_NAME = re.compile(r"^hetpd-kv-(\d+)-[0-9a-f]{16}$")


class Segment:
    """One mapped shared-memory file. ``create`` makes (and owns, i.e. unlinks) it."""

    def __init__(self, name: str, length: int, owner: bool, writable: bool) -> None:
        if not _NAME.match(name):
            raise ValueError(f"segment name {name!r} is not a hetpd segment name")
        self.name, self.length, self.owner = name, length, owner
        path = os.path.join(SHM_DIR, name)
        flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL) if owner else (os.O_RDWR if writable else os.O_RDONLY)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise ValueError(f"cannot open shared-memory segment {name!r}: {exc}") from exc
        try:
            if owner:
                os.ftruncate(fd, length)
            elif os.fstat(fd).st_size < length:
                raise ValueError(f"segment {name!r} is smaller than the {length} bytes announced")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if owner or writable else 0)
            # MAP_POPULATE: map every page now, not by a fault per 4 KiB inside the first copy.
            self.map = mmap.mmap(fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot)
        except BaseException:
            if owner:
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self.map)

    @classmethod
    def create(cls, length: int) -> Segment:
        return cls(f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}", length, owner=True, writable=True)

    def close(self) -> None:
        """Unmap (and unlink, if owned). Unlinking frees the name at once even while a caller
        still holds a view of the mapping (then the memory goes with the last view)."""
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a caller still holds a view from allocate_region; the GC unmaps it later


def remove_orphan_segments() -> list[str]:
    """Unlink hetpd segments whose creating process no longer exists; returns their names."""
    removed: list[str] = []
    for name in os.listdir(SHM_DIR):
        match = _NAME.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
        except PermissionError:
            pass  # alive, someone else's
    return removed


def list_segments(pid: int | None = None) -> list[str]:
    """hetpd segments present now (of process ``pid``, if given): for leak checks."""
    prefix = _PREFIX if pid is None else f"{_PREFIX}{pid}-"
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix) and _NAME.match(n))


class ShmReceiver(PullReceiver):
    """Maps the senders' segments read-only and copies posted pieces into its regions."""

    backend = BACKEND

    def __init__(self, host: str = "127.0.0.1", port: int = 0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 max_conns_per_peer: int = MAX_CONNS_PER_PEER, max_conns: int = MAX_CONNS) -> None:
        self._mapped: dict[tuple[int, str], Segment] = {}  # (id(conn), segment) -> mapping
        super().__init__(host, port, io_timeout, verify, key=key, handshake_timeout=handshake_timeout,
                         max_conns_per_peer=max_conns_per_peer, max_conns=max_conns)

    def _fetch(self, conn: Conn, source: dict[str, Any], piece: Span, dst: memoryview, hasher: Hasher | None) -> bytes:
        name, length = source.get("segment"), source.get("length")
        if not isinstance(name, str) or not isinstance(length, int):
            raise ValueError(f"source {source} names no shared-memory segment")
        key = (id(conn), name)
        segment = self._mapped.get(key)  # only this connection's thread touches its keys
        if segment is None:
            segment = Segment(name, length, owner=False, writable=False)
            self._mapped[key] = segment
        if piece.src_offset < 0 or piece.src_offset + piece.length > segment.length:
            raise ValueError(f"span src_offset={piece.src_offset} length={piece.length} outside segment "
                             f"{name!r} of {segment.length} bytes")
        return copy_and_digest(dst, segment.view[piece.src_offset : piece.src_offset + piece.length], hasher)

    def _forget_source(self, conn: Conn, source: dict[str, Any]) -> None:
        segment = self._mapped.pop((id(conn), str(source.get("segment"))), None)
        if segment is not None:
            segment.close()

    def _forget_peer(self, conn: Conn) -> None:
        for key in [k for k in self._mapped if k[0] == id(conn)]:
            self._mapped.pop(key).close()


class ShmSender(PullSender):
    """Exposes source regions as shared-memory segments it owns (unlinked on close)."""

    backend = BACKEND

    def __init__(self, fault: FaultInjection | None = None, piece_bytes: int = PIECE_BYTES,
                 connect_timeout: float = 5.0, io_timeout: float = 10.0, verify: bool = True, *,
                 key: bytes | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        super().__init__(fault, piece_bytes, connect_timeout, io_timeout, verify, key=key,
                         handshake_timeout=handshake_timeout)
        self._segments: dict[str, Segment] = {}
        self._staged: dict[str, memoryview] = {}  # region -> caller's buffer, staged at post

    def allocate_region(self, name: str, length: int) -> memoryview:
        check_name(name, "region name")
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if name in self._sources:
            raise ValueError(f"source region {name!r} is already registered; pick another name")
        segment = Segment.create(length)
        self._segments[name] = segment
        self._sources[name] = segment.view
        return segment.view[:]

    def register_region(self, name: str, buffer: Buffer) -> RegionDescriptor:
        view = writable_view(buffer, f"source region {name!r}")
        self.allocate_region(name, len(view))
        self._staged[name] = view
        return RegionDescriptor(self.backend, name, len(view), {"segment": self._segments[name].name})

    def _prepare(self, src_region: str, spans: tuple[Span, ...]) -> None:
        staged = self._staged.get(src_region)
        if staged is not None:  # stage the posted spans of the caller's buffer into the segment
            segment = self._sources[src_region]
            for span in spans:
                end = span.src_offset + span.length
                segment[span.src_offset : end] = staged[span.src_offset : end]

    def _release_source(self, name: str) -> None:
        self._tell_receivers_forget(name)
        self._staged.pop(name, None)
        self._segments.pop(name).close()

    def _source(self, src_region: str) -> dict[str, Any]:
        segment = self._segments[src_region]
        return {"segment": segment.name, "length": segment.length}

    def close(self) -> None:
        super().close()
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        self._sources.clear()
