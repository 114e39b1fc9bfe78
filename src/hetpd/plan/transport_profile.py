"""Measure this machine's KV transports (shm, loopback tcp) as planner links.

The planner prices a KV handoff with ``cost.handoff_time``::

    seconds = wire_bytes / bandwidth + latency + pages * per_transfer_overhead

The built-in catalog only has guesses for a host's own transports. This module measures the
three numbers for the ``shm`` and ``tcp`` (127.0.0.1) backends of ``hetpd.transfer``, the way
serving uses them: the sender is this process (the prefill side), the receiver is a separate
peer process (the decode side), checksums are on, and each transfer is timed from
``register_region`` + ``post`` to the sender holding the receiver's OK verdict (what a
producer waits for before it may free its KV). The producer registers each request's payload
anew, so for shm the figures include what that costs: a fresh shared-memory segment per
transfer and the staging copy into it. (A source registered once, e.g. with
``allocate_region``, moves much faster; see ``benchmarks/kv_transfer.py``.)

Per backend, payloads of a few sizes go as one span and as many page-sized spans (pages
scattered on the receiving side, as in a paged KV pool). Variants are interleaved and
repeated, the order rotating each round, and :func:`fit_link` takes per-variant medians and
fits the cost model's line: the byte slope gives the bandwidth, the intercept the fixed
latency per transfer, and the extra time of many spans over one span of the same size the
overhead per span (page).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import numpy as np

from hetpd.transfer import RegionDescriptor, Span, TransferReceiver, make_receiver, make_sender

KIB = 1 << 10
MIB = 1 << 20
BACKENDS = ("shm", "tcp")
# The smallest size pins the intercept (latency); the largest ones the slope (bandwidth).
FULL_SIZES = (64 * KIB, 1 * MIB, 8 * MIB, 32 * MIB)
QUICK_SIZES = (64 * KIB, 1 * MIB, 8 * MIB)
FULL_PAGES = (16 * KIB, 64 * KIB)  # page-sized spans: a KV page of a small to a mid-sized model
QUICK_PAGES = (16 * KIB,)
FULL_REPEATS = 11
QUICK_REPEATS = 7
PEER_REPLY_TIMEOUT_S = 60.0
TRANSFER_TIMEOUT_S = 60.0
BARRIER_BYTES = 4 * KIB



@dataclass(frozen=True)
class _Identity:
    """How a measured backend appears in the catalog."""

    link_id: str
    family: str  # spec.Link's: scale_up | host | rdma | tcp
    name: str


_IDENTITIES: Mapping[str, _Identity] = MappingProxyType({
    "shm": _Identity("local_shm", "host", "shared memory between processes (hetpd shm transport)"),
    "tcp": _Identity("local_tcp", "tcp", "TCP over loopback (hetpd tcp transport)"),
})


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the fit (pure)
@dataclass(frozen=True)
class Sample:
    """One timed transfer: ``nbytes`` of payload in ``spans`` spans took ``seconds``."""

    nbytes: int
    spans: int
    seconds: float


@dataclass(frozen=True)
class LinkFit:
    """The cost model's link parameters fitted to samples.

    ``per_span_overhead_us`` is never negative: a negative fitted value (many spans no slower
    than one, within noise) is clamped to 0, ``raw_per_span_overhead_us`` keeps the fitted
    value and ``notes`` says so. The same holds for the latency."""

    bandwidth_bytes_per_s: float
    latency_us: float
    per_span_overhead_us: float
    raw_latency_us: float
    raw_per_span_overhead_us: float
    max_relative_residual: float  # worst |model - median| / median over the variants
    variants: int  # distinct (nbytes, spans) groups fitted
    notes: tuple[str, ...] = ()


def fit_link(samples: Sequence[Sample]) -> LinkFit:
    """Fit ``seconds = latency + nbytes / bandwidth + spans * per_span`` to ``samples``.

    Repeats of the same (nbytes, spans) are reduced to their median first (robust to the odd
    slow run on a shared machine). The three parameters are then fitted by least squares on
    *relative* error (each median weighted by 1/itself), so a 64 KiB transfer's 100 us counts
    as much as a 32 MiB transfer's milliseconds: the small sizes fix the intercept, the large
    sizes the slope, and same-size variants with different span counts the per-span term.

    ``spans`` counts every span, the one of a one-span transfer included, as ``handoff_time``
    charges ``pages * per_transfer_overhead``; the intercept is what a transfer costs beyond
    its bytes and spans.

    Raises ValueError naming the problem for input that cannot determine the three numbers:
    no samples, a non-positive field, fewer than two sizes, no size measured with two span
    counts, or times that do not grow with the bytes.
    """
    if not samples:
        raise ValueError("no samples: measure at least two sizes, one of them with two span counts")
    for index, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise ValueError(f"samples[{index}] must be a Sample, got {type(s).__name__}")
        if s.nbytes <= 0 or s.spans <= 0 or not s.seconds > 0 or not np.isfinite(s.seconds):
            raise ValueError(f"samples[{index}] = {s}: nbytes and spans must be > 0 and seconds a finite "
                             f"positive time")
    groups: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        groups.setdefault((s.nbytes, s.spans), []).append(s.seconds)
    sizes = sorted({nbytes for nbytes, _ in groups})
    if len(sizes) < 2:
        raise ValueError(f"samples cover one transfer size ({sizes[0]} bytes): bandwidth and latency need at "
                         f"least two sizes")
    spans_by_size: dict[int, set[int]] = {}
    for nbytes, spans in groups:
        spans_by_size.setdefault(nbytes, set()).add(spans)
    if all(len(counts) < 2 for counts in spans_by_size.values()):
        raise ValueError("no transfer size was measured with two different span counts: the per-span overhead "
                         "needs e.g. one span and many page-sized spans of the same bytes")
    keys = sorted(groups)
    medians = np.array([statistics.median(groups[k]) for k in keys])
    design = np.array([[1.0, float(nbytes), float(spans)] for nbytes, spans in keys])
    weights = 1.0 / medians
    # Scale the columns so the solve is well conditioned (bytes are ~1e7, the others ~1).
    scale = np.abs(design).max(axis=0)
    solution, _, rank, _ = np.linalg.lstsq(design / scale * weights[:, None], medians * weights, rcond=None)
    if rank < 3:
        raise ValueError(f"the samples do not determine latency, bandwidth and per-span overhead separately "
                         f"(rank {rank} of 3); measure more sizes and span counts")
    latency_s, seconds_per_byte, per_span_s = (solution / scale).tolist()
    if not seconds_per_byte > 0:
        raise ValueError(f"time does not grow with bytes (fitted {seconds_per_byte:.3g} s/byte): bandwidth cannot "
                         f"be fitted; measure larger transfers")
    model = design @ np.array([latency_s, seconds_per_byte, per_span_s])
    residual = float(np.max(np.abs(model - medians) / medians))
    notes: list[str] = []
    raw_latency_us, raw_per_span_us = latency_s * 1e6, per_span_s * 1e6
    if raw_per_span_us < 0:
        notes.append(f"per-span overhead fitted {raw_per_span_us:.2f} us (many spans no slower than one, "
                     f"within noise); clamped to 0")
    if raw_latency_us < 0:
        notes.append(f"latency fitted {raw_latency_us:.1f} us (intercept below zero, within noise); clamped to 0")
    return LinkFit(1.0 / seconds_per_byte, max(0.0, raw_latency_us), max(0.0, raw_per_span_us), raw_latency_us,
                   raw_per_span_us, residual, len(keys), tuple(notes))


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LinkMeasurement:
    """One backend measured on this host: the fit, the samples it came from, where and when."""

    backend: str  # "shm" | "tcp"
    fit: LinkFit
    samples: tuple[Sample, ...]
    hostname: str
    date: str  # ISO date of the measurement
    largest_transfer_gbps: float  # median throughput of the largest one-span transfer, for reference

    @property
    def bandwidth_gbps(self) -> float:
        """Fitted bandwidth in GB/s (1e9 bytes), the catalog's unit."""
        return self.fit.bandwidth_bytes_per_s / 1e9

    def as_catalog_entry(self) -> dict[str, Any]:
        """This link as a catalog ``links:`` entry (``spec.load_catalog`` builds a ``Link`` from it).

        The bandwidth is measured, so ``efficiency`` is 1.0. Clamping notes (see
        :class:`LinkFit`) are kept as extra ``sources`` lines, the only free text a Link has."""
        identity = _IDENTITIES[self.backend]
        return {
            "id": identity.link_id,
            "name": f"{identity.name} on {self.hostname}",
            "family": identity.family,
            "peak_unidir_gbps": round(self.bandwidth_gbps, 3),
            "efficiency": 1.0,
            "latency_us": round(self.fit.latency_us, 2),
            "per_transfer_overhead_us": round(self.fit.per_span_overhead_us, 3),
            "confidence": "high",
            "sources": [f"measured by hetpd profile on {self.hostname} {self.date}", *self.fit.notes],
        }

    def summary(self) -> str:
        return (f"{self.backend}: {self.bandwidth_gbps:.2f} GB/s, latency {self.fit.latency_us:.1f} us, "
                f"{self.fit.per_span_overhead_us:.2f} us per span (largest transfer {self.largest_transfer_gbps:.2f} "
                f"GB/s; fit within {100 * self.fit.max_relative_residual:.0f}% of every median)")


# ---------------------------------------------------------------------------- the peer process
def serve_peer(max_size: int) -> None:
    """The receiving process: a ``shm`` and a ``tcp`` receiver sharing one prefaulted region.

    Driven by JSON lines on stdin, one JSON reply line each on stdout (never pickle):
    ``{"cmd": "expect", "backend", "tids"}`` first collects the results of earlier transfers
    (reporting any that were not OK), then expects the new ids; ``{"cmd": "quit"}``."""
    region = np.empty(max_size, dtype=np.uint8)
    region.fill(0)  # touch every page now: a first-touch fault must not be timed
    receivers: dict[str, TransferReceiver] = {backend: make_receiver(backend) for backend in BACKENDS}
    try:
        descriptors = {b: r.register_region("kv", region).to_dict() for b, r in receivers.items()}
        print(json.dumps({"descriptors": descriptors}), flush=True)
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
                if cmd["cmd"] == "quit":
                    print(json.dumps({"ok": True}), flush=True)
                    return
                receiver = receivers[cmd["backend"]]
                failed = [f"{r.transfer_id}: {r.status.value} {r.error}" for r in receiver.poll() if not r.ok]
                for tid in cmd["tids"]:
                    receiver.expect(tid, "kv")
                print(json.dumps({"ok": True, "failed": failed}), flush=True)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    finally:
        for receiver in receivers.values():
            receiver.close()


class _Peer:
    """A :func:`serve_peer` process, running the same ``hetpd`` as this one."""

    def __init__(self, max_size: int) -> None:
        import hetpd

        package_root = str(Path(hetpd.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        code = "import sys; from hetpd.plan.transport_profile import serve_peer; serve_peer(int(sys.argv[1]))"
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(max_size)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1, env=env)
        try:
            self.descriptors: dict[str, dict[str, Any]] = self._read()["descriptors"]
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], PEER_REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"transport profile peer process gave no reply in {PEER_REPLY_TIMEOUT_S:g} s "
                               f"(exit code {self.proc.poll()}); its stderr:\n{tail}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"transport profile peer: {reply['error']}")
        return reply

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def expect(self, backend: str, tids: list[str]) -> None:
        failed = self.call(cmd="expect", backend=backend, tids=tids)["failed"]
        if failed:
            raise RuntimeError(f"{backend} transfers failed on the receiver: {failed}")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call(cmd="quit")
                    self.proc.wait(timeout=10)
                except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self._stderr.close()


# ---------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class _Variant:
    nbytes: int
    page: int | None  # None: one span

    def spans(self, rng: random.Random) -> list[Span]:
        if self.page is None:
            return [Span(0, 0, self.nbytes)]
        count = -(-self.nbytes // self.page)
        slots = list(range(count))
        rng.shuffle(slots)  # pages land scattered, as in a paged KV pool
        return [Span(i * self.page, slot * self.page, min(self.page, self.nbytes - i * self.page))
                for i, slot in enumerate(slots)]


def _measure_backend(backend: str, peer: _Peer, source: memoryview, sizes: Sequence[int], pages: Sequence[int],
                     repeats: int, log: Callable[[str], None]) -> tuple[Sample, ...]:
    """Time every variant once per round, ``repeats`` interleaved rounds after an untimed one.

    A transfer is timed as the producer runs it: register the payload, post its spans (final),
    wait for the receiver's verdict. Its cleanup (unregister: the shm receiver unmaps the
    segment, freeing its pages) runs after the verdict, off the handoff's path; a small
    untimed *barrier* transfer on the same connection then waits for that cleanup, so no
    timed transfer pays for its predecessor's."""
    dst = RegionDescriptor.from_dict(peer.descriptors[backend])
    variants = [_Variant(n, page) for n in sizes for page in (None, *pages) if page is None or page < n]
    rng = random.Random(0)
    spans = {v: v.spans(rng) for v in variants}
    barrier = [Span(0, 0, BARRIER_BYTES)]
    samples: list[Sample] = []
    with make_sender(backend) as sender:
        sender.register_region("barrier", source[:BARRIER_BYTES])

        def finish(tid: str, expected: int, what: str) -> None:
            result = sender.wait(tid, TRANSFER_TIMEOUT_S)
            if not result.ok or result.nbytes != expected:
                raise RuntimeError(f"{backend} transfer of {what} did not complete: {result}")

        def transfer(tid: str, variant: _Variant) -> float:
            start = time.perf_counter()
            sender.register_region(tid, source[: variant.nbytes])
            sender.post(tid, tid, dst, spans[variant], final=True)
            finish(tid, variant.nbytes, f"{variant.nbytes} bytes in {len(spans[variant])} spans")
            elapsed = time.perf_counter() - start
            sender.unregister_region(tid)
            sender.post(f"{tid}-barrier", "barrier", dst, barrier, final=True)
            finish(f"{tid}-barrier", BARRIER_BYTES, "the barrier")
            return elapsed

        for rep in range(repeats + 1):  # round 0 warms up (connection, mappings, caches): not timed
            order = variants[rep % len(variants):] + variants[: rep % len(variants)]
            tids = [f"profile-{backend}-{rep}-{i}" for i in range(len(order))]
            peer.expect(backend, [t for tid in tids for t in (tid, f"{tid}-barrier")])
            for tid, variant in zip(tids, order, strict=True):
                elapsed = transfer(tid, variant)
                if rep > 0:
                    samples.append(Sample(variant.nbytes, len(spans[variant]), elapsed))
            if rep > 0:
                log(f"[profile] {backend}: round {rep}/{repeats} ({len(order)} transfers)")
    return tuple(samples)


def measure_links(quick: bool = False, log: Callable[[str], None] = _stderr) -> list[LinkMeasurement]:
    """Measure the ``shm`` and ``tcp`` (loopback) transports of this host against a peer process.

    Sizes, page sizes and repeats: ``FULL_*`` / ``QUICK_*``. Returns one
    :class:`LinkMeasurement` per backend, in ``BACKENDS`` order; raises RuntimeError if a
    transfer fails or the peer process does not answer. Everything it opened (the peer
    process, sockets, shared-memory segments) is closed before it returns or raises."""
    sizes = QUICK_SIZES if quick else FULL_SIZES
    pages = QUICK_PAGES if quick else FULL_PAGES
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    largest = max(sizes)
    log(f"[profile] transports {', '.join(BACKENDS)}: sizes {', '.join(_human(s) for s in sizes)}, one span vs "
        f"{', '.join(_human(p) for p in pages)} pages, {repeats} interleaved rounds, checksums on")
    source = memoryview(bytearray(random.Random(1).randbytes(largest)))
    hostname, date = socket.gethostname(), dt.date.today().isoformat()
    results: list[LinkMeasurement] = []
    peer = _Peer(largest)
    try:
        for backend in BACKENDS:
            samples = _measure_backend(backend, peer, source, sizes, pages, repeats, log)
            fit = fit_link(samples)
            one_span = statistics.median(s.seconds for s in samples if s.nbytes == largest and s.spans == 1)
            measured = LinkMeasurement(backend, fit, samples, hostname, date, largest / one_span / 1e9)
            log(f"[profile] {measured.summary()}")
            for note in fit.notes:
                log(f"[profile] {backend}: {note}")
            results.append(measured)
    finally:
        peer.close()
    return results


def _human(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"
