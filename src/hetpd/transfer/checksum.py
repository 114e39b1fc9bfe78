"""Integrity values of payload pieces, taken while the bytes are hot in cache. Pure Python.

Payload moves in *pieces* of at most ``PIECE_BYTES``; each piece has its own integrity value,
so a mismatch names a small span and a streaming sender never hashes more than one piece ahead.

* **Without a key** (one trusted process or host): xxh3-64 of the payload, 8 bytes. It catches
  corruption, not forgery: whoever sends the bytes can send a matching checksum.
* **With a key**: a keyed BLAKE3 MAC (32 bytes) under the transfer's piece key
  (``auth.TransferAuth``), over the piece's ``dst_offset`` and ``length`` (fixed width) and
  then its payload: only a holder of the deployment key can make one, and a piece replayed at
  another offset or into another transfer fails. BLAKE3 releases the GIL while it hashes and
  runs at ~6 GB/s on one core against xxh3's ~17 GB/s (Xeon, 1 MiB pieces in cache): the price of
  authenticity, measured in ``benchmarks/kv_transfer.py``.

Copies run in ``CHUNK_BYTES`` chunks (half the 2 MiB L2 of the machines we measured), each
hashed straight after it was written, while it is still in L2: one pass over memory instead
of a copy pass plus a hash pass. Measured (EPYC, 2 cores, 256 MiB, source in /dev/shm): 1 MiB
chunks copy+hash (xxh3) at ~9.6 GB/s against ~12.5 GB/s for the bare copy; 256 KiB chunks only
~5.9 GB/s, because small copies out of a 4 KiB-page shm mapping run at half the speed of
large ones (the large ones use non-temporal stores).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

import blake3
import xxhash

from hetpd.transfer.base import Span

PIECE_BYTES = 4 << 20
CHUNK_BYTES = 1 << 20
XXH3_BYTES = 8
MAC_BYTES = 32
DIGEST_FIELD_BYTES = max(XXH3_BYTES, MAC_BYTES)  # what a fixed-size wire field must hold
_PIECE_HEADER = struct.Struct("!QQ")  # dst_offset, length: what the MAC binds the payload to


class Hasher(Protocol):
    """An incremental hash (``xxhash.xxh3_64`` or ``blake3.blake3``)."""

    def update(self, data: memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def digest_size(mac_key: bytes | None) -> int:
    return XXH3_BYTES if mac_key is None else MAC_BYTES


def piece_hasher(piece: Span, mac_key: bytes | None) -> Hasher:
    """A fresh hasher for ``piece``: xxh3-64 without a key, else keyed BLAKE3 already fed the
    piece's destination offset and length (so the MAC covers where the bytes land)."""
    if mac_key is None:
        return xxhash.xxh3_64()
    return blake3.blake3(_PIECE_HEADER.pack(piece.dst_offset, piece.length), key=mac_key)


def digest(piece: Span, payload: memoryview, mac_key: bytes | None) -> bytes:
    """The integrity value of ``payload``, sent as ``piece``."""
    if mac_key is None:
        return xxhash.xxh3_64_digest(payload)
    hasher = piece_hasher(piece, mac_key)
    hasher.update(payload)
    return hasher.digest()


def pieces(spans: list[Span] | tuple[Span, ...], piece_bytes: int = PIECE_BYTES) -> Iterator[Span]:
    """``spans`` cut into pieces of at most ``piece_bytes``, in order."""
    for span in spans:
        for start in range(0, span.length, piece_bytes):
            length = min(piece_bytes, span.length - start)
            yield Span(span.src_offset + start, span.dst_offset + start, length)


def copy_and_digest(dst: memoryview, src: memoryview, hasher: Hasher | None) -> bytes:
    """Copy ``src`` into ``dst`` (same length) chunk by chunk, hashing each chunk of ``dst``
    just after writing it. Returns the digest of the bytes now in ``dst`` (b"" without a
    hasher, i.e. not verifying)."""
    if hasher is None:
        dst[:] = src
        return b""
    for start in range(0, len(src), CHUNK_BYTES):
        end = min(start + CHUNK_BYTES, len(src))
        dst[start:end] = src[start:end]
        hasher.update(dst[start:end])
    return hasher.digest()


def hash_landed(dst: memoryview, hasher: Hasher | None) -> bytes:
    """The digest of bytes already in ``dst`` (written by someone else, e.g. a NIXL READ)."""
    if hasher is None:
        return b""
    for start in range(0, len(dst), CHUNK_BYTES):
        hasher.update(dst[start : start + CHUNK_BYTES])
    return hasher.digest()


def mismatch_message(transfer_id: str, span: Span, expected: bytes, got: bytes, keyed: bool) -> str:
    # "checksum" is the word the handoff layer maps to a checksum failure: keep it in both forms.
    kind = "checksum mismatch (keyed BLAKE3 MAC)" if keyed else "checksum mismatch"
    return (f"transfer {transfer_id!r}: {kind} in span src_offset={span.src_offset} "
            f"dst_offset={span.dst_offset} length={span.length} (sender {expected.hex()[:16]}, "
            f"landed {got.hex()[:16]}); bytes corrupted in flight, the source changed after posting"
            + (", or a sender without the key" if keyed else ""))
