#!/usr/bin/env python
"""KV transfer cost: the byte transports against their raw paths, on this machine, in one run.

Sections (``SECTIONS``; each is one function, add the KV conversion-cost section there):

* **shm**: ``ShmSender`` (source in a segment from ``allocate_region``) -> ``ShmReceiver`` in
  another process, timed from ``post`` to the sender's OK verdict, against the raw path: one
  ``numpy.copyto`` of the same bytes between two buffers in one process.
* **tcp**: ``TcpSender`` -> ``TcpReceiver`` in another process over 127.0.0.1, timed from
  ``post`` to the OK verdict, against the raw path: a plain ``sendall`` / ``recv_into`` loop
  between the same two processes over 127.0.0.1 (same socket options, same 1 MiB send and
  receive sizes as the transport: measured here, they beat one huge sendall / recv_into),
  timed to a one-byte ack.

* **conversion** (``kv_conversion.py``): each KV representation conversion through bytes
  (unpack, convert, pack) in GB/s of producer bytes, beside a plain copy of the same bytes.

Each transport runs keyless with checksums (xxh3, the default), keyless without
(``verify=False`` on both sides), and keyed (``key=``: handshake, transfer tags and keyed
BLAKE3 piece MACs, what ``hetpd serve`` runs). For every size the variants are interleaved
(raw, transport, transport without checksum, keyed; the order rotating each repeat) and
repeated; we report medians of throughput and the median of the per-repeat ratios, which is
what survives a noisy shared machine. ``keyed/xxh3`` is the MAC's cost: keyed throughput over
keyless-checksummed throughput (1.0: free).

Run from the repository root:  .venv/bin/python benchmarks/kv_transfer.py [--quick]
Writes benchmarks/results/kv_transfer.json, .txt (the table) and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetpd.transfer import RegionDescriptor, Span, TransferSender, make_receiver, make_sender
from hetpd.transfer.checksum import CHUNK_BYTES
from hetpd.transfer.net import tune
from hetpd.transfer.tcp import TCP_PIECE_BYTES

import kv_conversion  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
SIZES_MIB = [1, 4, 16, 64, 256]
QUICK_SIZES_MIB = [1, 4, 16]
TARGET_RATIO = 0.80  # transport / raw throughput at >= 16 MiB
TARGET_CHECKSUM_OVERHEAD = 0.10
# receiver name -> (backend, verify, keyed)
RECEIVERS = {"shm": ("shm", True, False), "shm_nc": ("shm", False, False), "shm_key": ("shm", True, True),
             "tcp": ("tcp", True, False), "tcp_nc": ("tcp", False, False), "tcp_key": ("tcp", True, True)}
KEY_ENV = "HETPD_BENCH_KEY"  # the parent's random key, hex, handed to the child process


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prefaulted(size: int, fill: int = 0) -> np.ndarray:
    """A buffer whose pages are already mapped (a first touch would be timed otherwise)."""
    buffer = np.empty(size, dtype=np.uint8)
    buffer.fill(fill)
    return buffer


# ---------------------------------------------------------------------------- the peer process
def child(max_size: int) -> None:
    """The receiving process: one region shared by every receiver, plus the raw TCP server.
    Driven by JSON lines on stdin (no pickle anywhere)."""
    region = prefaulted(max_size)
    key = bytes.fromhex(os.environ[KEY_ENV])
    receivers = {name: make_receiver(backend, verify=verify, key=key if keyed else None)
                 for name, (backend, verify, keyed) in RECEIVERS.items()}
    descriptors = {name: r.register_region("kv", region).to_dict() for name, r in receivers.items()}
    server = socket.create_server(("127.0.0.1", 0))

    def raw_server() -> None:
        conn, _ = server.accept()
        tune(conn)
        conn.settimeout(None)
        view = memoryview(region)
        header = bytearray(8)
        while True:
            if conn.recv_into(header, 8, socket.MSG_WAITALL) != 8:
                return
            (size,) = struct.unpack("!Q", header)
            pos = 0
            while pos < size:  # the transport's read size: a fair, not a handicapped, baseline
                got = conn.recv_into(view[pos : min(size, pos + CHUNK_BYTES)])
                if got == 0:
                    return
                pos += got
            conn.sendall(b"k")

    threading.Thread(target=raw_server, daemon=True).start()
    print(json.dumps({"descriptors": descriptors, "raw_port": server.getsockname()[1]}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":
            receiver = receivers[cmd["which"]]
            receiver.poll()  # results the parent already saw from its sender: drop them
            receiver.expect(cmd["tid"], "kv")
            print(json.dumps({"ok": True}), flush=True)
        elif cmd["cmd"] == "quit":
            break
    for receiver in receivers.values():
        receiver.close()


class Peer:
    def __init__(self, max_size: int, key: bytes) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(max_size)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, KEY_ENV: key.hex()})
        hello = self._read()
        self.descriptors = {k: RegionDescriptor.from_dict(v) for k, v in hello["descriptors"].items()}
        self.raw_port: int = hello["raw_port"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        if not ready:
            raise RuntimeError("benchmark peer did not answer in 120 s")
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def expect(self, which: str, tid: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "expect", "which": which, "tid": tid}) + "\n")
        self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Row:
    section: str
    size_mib: int
    raw_gbps: float
    transport_gbps: float
    nocheck_gbps: float
    ratio: float  # median over repeats of transport / raw
    nocheck_ratio: float
    checksum_overhead: float  # median over repeats of 1 - transport / transport-without-checksum
    repeats: int
    keyed_gbps: float = 0.0  # keyed: handshake, tags, keyed BLAKE3 MACs
    keyed_ratio: float = 0.0  # median over repeats of keyed / raw
    keyed_vs_checksum: float = 0.0  # median over repeats of keyed / keyless-checksummed throughput


@dataclass
class Context:
    peer: Peer
    sizes: list[int]
    repeats: int
    key: bytes
    counter: int = 0

    def tid(self) -> str:
        self.counter += 1
        return f"bench-{self.counter}"


def timed_transfer(ctx: Context, sender: TransferSender, which: str, size: int) -> float:
    tid = ctx.tid()
    ctx.peer.expect(which, tid)
    start = time.perf_counter()
    sender.post(tid, "src", ctx.peer.descriptors[which], [Span(0, 0, size)], final=True)
    result = sender.wait(tid, 120)
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"{which} transfer of {size} bytes: {result}")
    return elapsed


def interleaved(ctx: Context, section: str, size: int, variants: dict[str, Callable[[], float]]) -> Row:
    """Run the variants in rotating order, ``ctx.repeats`` times; medians of throughput and ratios."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(ctx.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            elapsed = variants[name]()
            times[name].append(elapsed)
            log(f"{section:4s} {size // MIB:4d} MiB rep {rep + 1}/{ctx.repeats} {name:9s} "
                f"{size / elapsed / 1e9:7.2f} GB/s")
    gbps = {name: statistics.median(size / t / 1e9 for t in ts) for name, ts in times.items()}
    raw, tr, nc, kd = times["raw"], times["transport"], times["no_check"], times["keyed"]
    return Row(section, size // MIB, gbps["raw"], gbps["transport"], gbps["no_check"],
               ratio=statistics.median(r / t for r, t in zip(raw, tr)),
               nocheck_ratio=statistics.median(r / n for r, n in zip(raw, nc)),
               checksum_overhead=statistics.median(1 - n / t for n, t in zip(nc, tr)),
               repeats=ctx.repeats, keyed_gbps=gbps["keyed"],
               keyed_ratio=statistics.median(r / k for r, k in zip(raw, kd)),
               keyed_vs_checksum=statistics.median(t / k for t, k in zip(tr, kd)))


def shm_section(ctx: Context) -> list[Row]:
    largest = max(ctx.sizes) * MIB
    src, dst = prefaulted(largest, 7), prefaulted(largest)
    src[:] = np.random.default_rng(0).integers(0, 256, largest, dtype=np.uint8)
    senders = {"shm": make_sender("shm"), "shm_nc": make_sender("shm", verify=False),
               "shm_key": make_sender("shm", key=ctx.key)}
    for sender in senders.values():
        np.frombuffer(sender.allocate_region("src", largest), dtype=np.uint8)[:] = src  # producer writes here
    rows = []
    try:
        for mib in ctx.sizes:
            size = mib * MIB

            def raw(size: int = size) -> float:
                start = time.perf_counter()
                np.copyto(dst[:size], src[:size])
                return time.perf_counter() - start

            rows.append(interleaved(ctx, "shm", size, {
                "raw": raw,
                "transport": lambda size=size: timed_transfer(ctx, senders["shm"], "shm", size),  # type: ignore[misc]
                "no_check": lambda size=size: timed_transfer(ctx, senders["shm_nc"], "shm_nc", size),  # type: ignore[misc]
                "keyed": lambda size=size: timed_transfer(ctx, senders["shm_key"], "shm_key", size),  # type: ignore[misc]
            }))
    finally:
        for sender in senders.values():
            sender.close()
    return rows


def tcp_section(ctx: Context) -> list[Row]:
    largest = max(ctx.sizes) * MIB
    src = np.random.default_rng(1).integers(0, 256, largest, dtype=np.uint8)
    senders = {"tcp": make_sender("tcp"), "tcp_nc": make_sender("tcp", verify=False),
               "tcp_key": make_sender("tcp", key=ctx.key)}
    for sender in senders.values():
        sender.register_region("src", src)
    raw_sock = socket.create_connection(("127.0.0.1", ctx.peer.raw_port))
    tune(raw_sock)
    raw_sock.settimeout(None)
    view, ack = memoryview(src), bytearray(1)
    rows = []
    try:
        for mib in ctx.sizes:
            size = mib * MIB

            def raw(size: int = size) -> float:
                start = time.perf_counter()
                raw_sock.sendall(struct.pack("!Q", size))
                for at in range(0, size, TCP_PIECE_BYTES):  # the transport's send size
                    raw_sock.sendall(view[at : min(size, at + TCP_PIECE_BYTES)])
                raw_sock.recv_into(ack, 1)
                return time.perf_counter() - start

            rows.append(interleaved(ctx, "tcp", size, {
                "raw": raw,
                "transport": lambda size=size: timed_transfer(ctx, senders["tcp"], "tcp", size),  # type: ignore[misc]
                "no_check": lambda size=size: timed_transfer(ctx, senders["tcp_nc"], "tcp_nc", size),  # type: ignore[misc]
                "keyed": lambda size=size: timed_transfer(ctx, senders["tcp_key"], "tcp_key", size),  # type: ignore[misc]
            }))
    finally:
        raw_sock.close()
        for sender in senders.values():
            sender.close()
    return rows


# One function per section: Context -> rows. The KV conversion-cost section goes here too.
SECTIONS: list[Callable[[Context], list[Row]]] = [shm_section, tcp_section]


# ---------------------------------------------------------------------------- reporting
def table(rows: list[Row]) -> str:
    lines = [f"{'path':5s} {'MiB':>5s} {'raw GB/s':>9s} {'xport GB/s':>10s} {'no-cksum':>9s} {'keyed':>9s} "
             f"{'xport/raw':>9s} {'nock/raw':>9s} {'keyed/raw':>9s} {'cksum ovh':>9s} {'keyed/xxh3':>10s}  target"]
    for r in rows:
        meets = ""
        if r.size_mib >= 16:  # the targets apply from 16 MiB
            meets = (f"ratio {'met' if r.ratio >= TARGET_RATIO else 'MISSED'}, "
                     f"checksum {'met' if r.checksum_overhead < TARGET_CHECKSUM_OVERHEAD else 'MISSED'}")
        lines.append(f"{r.section:5s} {r.size_mib:5d} {r.raw_gbps:9.2f} {r.transport_gbps:10.2f} {r.nocheck_gbps:9.2f} "
                     f"{r.keyed_gbps:9.2f} {r.ratio:9.2f} {r.nocheck_ratio:9.2f} {r.keyed_ratio:9.2f} "
                     f"{r.checksum_overhead:9.1%} {r.keyed_vs_checksum:10.2f}  {meets}")
    return "\n".join(lines)


def plot(rows: list[Row], conversions: list[kv_conversion.ConversionResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, section in zip(axes, ("shm", "tcp")):
        mine = [r for r in rows if r.section == section]
        sizes = [r.size_mib for r in mine]
        ax.plot(sizes, [r.raw_gbps for r in mine], "k--o", label="raw path")
        ax.plot(sizes, [r.transport_gbps for r in mine], "-o", label="transport (xxh3 checksum)")
        ax.plot(sizes, [r.nocheck_gbps for r in mine], "-s", label="transport, no checksum")
        ax.plot(sizes, [r.keyed_gbps for r in mine], "-^", label="transport, keyed (BLAKE3 MAC)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("transfer size (MiB)")
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"{section}: transport vs raw")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    labels = [f"{c.source} -> {c.target}" for c in conversions]
    ax.barh(labels, [c.convert_gbps for c in conversions], label="conversion")
    ax.axvline(statistics.median(c.copy_gbps for c in conversions), color="k", ls="--", label="plain copy (median)")
    ax.set_xscale("log")
    ax.set_xlabel("GB/s of producer bytes (median)")
    ax.set_title("KV conversion cost")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1-16 MiB, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB
    repeats = args.repeats or (3 if args.quick else 5)
    load_before = os.getloadavg()
    log(f"load average {load_before}; sizes {sizes} MiB, {repeats} repeats")
    key = secrets.token_bytes(32)  # a deployment secret; both sides of the keyed variants hold it
    peer = Peer(max(sizes) * MIB, key)
    ctx = Context(peer, sizes, repeats, key)
    rows: list[Row] = []
    try:
        for section in SECTIONS:
            rows.extend(section(ctx))
    finally:
        peer.close()
    log("conversion section")
    conversions = kv_conversion.measure(repeats, args.quick)
    print(table(rows))
    print("\n" + kv_conversion.table(conversions))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "kv_transfer.txt").write_text(
        f"load average before {load_before}, after {os.getloadavg()}\n" + table(rows) + "\n\n"
        + kv_conversion.table(conversions) + "\n")
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_before": load_before,  # a busy shared machine inflates the transports' cost
        "load_average_after": os.getloadavg(),
        "targets": {"ratio_at_16mib_plus": TARGET_RATIO, "checksum_overhead": TARGET_CHECKSUM_OVERHEAD},
        "rows": [asdict(r) for r in rows],
        "conversions": [asdict(c) | {"copies": c.copies} for c in conversions],
    }
    (RESULTS_DIR / "kv_transfer.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, conversions, RESULTS_DIR / "kv_transfer.png")
    log(f"wrote {RESULTS_DIR / 'kv_transfer.json'} and kv_transfer.png")


if __name__ == "__main__":
    main()
