"""Strangers on a deployment's own ports: the KV data plane and the router's control port.

What an attacker with a copy of the docs tried (sending only to 127.0.0.1): naming live
transfer ids on a decode worker's KV receiver to put words in the model's mouth, holding
connections open with a 4-byte header that announces a huge frame, and the same on the
router's control port. Real ``hetpd serve`` processes; the attacker uses raw sockets.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from serve.served import Served, serve
from transfer.rogue import closed_within

from hetpd.serve.local import worker_pids
from hetpd.transfer.tcp import DATA, END, FLAG_FINAL, FRAME, MAGIC

PROMPTS = [f"w{i} w{i + 7} w{i + 30} w{i * 3 % 200} w{i + 1}" for i in range(12)]


def deployment(model: Path, transport: str) -> dict[str, Any]:
    return {"model": str(model), "served_model_name": "tiny", "router": {"host": "127.0.0.1"},
            "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 128, "transport": transport},
                      {"name": "decode", "role": "decode", "num_kv_blocks": 128, "transport": transport,
                       "dtype": "bfloat16", "kv_cache_dtype": "int8"}]}


def complete(served: Served, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(served.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.loads(response.read())
    return str(reply["choices"][0]["text"])


def kv_receiver(served: Served) -> tuple[str, int]:
    match = re.search(r"worker decode-0: KV receiver \(\w+\) on ([\d.]+):(\d+)", served.log())
    assert match, served.log()
    return match.group(1), int(match.group(2))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def forged(transfer_id: str) -> bytes:
    """What the probe sent: 4 KiB of KV for a transfer it names, then a final END (tcp protocol)."""
    tid, region = transfer_id.encode(), transfer_id.encode()
    data = FRAME.pack(MAGIC, DATA, 0, 0, len(tid), len(region), 0, 0, 4096, b"", b"") + tid + region + b"\xaa" * 4096
    end = FRAME.pack(MAGIC, END, 0, FLAG_FINAL, len(tid), len(region), 0, 0, 0, b"", b"")
    return data + end + tid + region


@pytest.mark.timeout(300)
def test_a_stranger_cannot_hijack_kv_transfers(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), "tcp"), tmp_path) as served:
        expected = {p: complete(served, p) for p in PROMPTS}
        host, port = kv_receiver(served)
        stop = threading.Event()
        attempts: list[bool] = []  # each: was the stranger's connection closed on it?

        def attack() -> None:
            n = 0
            while not stop.is_set():
                with socket.create_connection((host, port), timeout=5) as sock:
                    try:  # the ids the probe guessed; real ones are random now, but it tries
                        sock.sendall(forged(f"req-{n}~1@1") + forged(f"req-{n + 1}~1@1"))
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    attempts.append(closed_within(sock, 10.0))
                n += 1

        attackers = [threading.Thread(target=attack, daemon=True) for _ in range(3)]
        for thread in attackers:
            thread.start()
        try:
            results: dict[str, str] = {}
            workers = [threading.Thread(target=lambda p=p: results.__setitem__(p, complete(served, p)))
                       for p in PROMPTS]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join(timeout=120)
        finally:
            stop.set()
            for thread in attackers:
                thread.join(timeout=20)
        assert results == expected  # every victim gets its own text, and a 200
        assert len(attempts) >= 3 and all(attempts)  # every stranger was cut off
        served.wait_idle()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_connection_floods_cost_the_kv_receiver_nothing(transport: str, tiny_model_dir: Callable[[str], Path],
                                                        tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), transport), tmp_path) as served:
        expected = complete(served, PROMPTS[0])
        host, port = kv_receiver(served)
        decode = worker_pids(served.process.pid)["decode-0"]
        before = rss_kb(decode)
        floods = []
        for _ in range(50):  # more than the per-peer cap: the rest are closed at accept
            try:
                sock = socket.create_connection((host, port), timeout=5)
                sock.sendall(struct.pack("!I", 16 << 20))  # a 4-byte header announcing 16 MiB
                floods.append(sock)
            except OSError:
                pass
        assert complete(served, PROMPTS[0]) == expected  # serving goes on meanwhile
        started = time.monotonic()
        assert all(closed_within(sock, 15.0) for sock in floods)
        closed_after = time.monotonic() - started
        for sock in floods:
            sock.close()
        grown = rss_kb(decode) - before
        assert grown < 20_000, f"decode worker RSS grew by {grown} kB"
        assert closed_after < 10.0  # the handshake timeout (5 s) and some slack
        served.wait_idle()


@pytest.mark.timeout(300)
def test_strangers_on_the_control_port_cost_the_router_nothing(tiny_model_dir: Callable[[str], Path],
                                                               tmp_path: Path) -> None:
    with serve(deployment(tiny_model_dir("llama"), "shm"), tmp_path) as served:
        host, port = served.log().split("router control on ")[1].split(";")[0].rsplit(":", 1)
        before = rss_kb(served.process.pid)
        strangers = []
        for _ in range(40):
            sock = socket.create_connection((host, int(port)), timeout=5)
            try:
                sock.sendall(struct.pack("!I", 64 << 20) + b"x" * 65536)  # announces 64 MiB, sends 64 KiB
            except (BrokenPipeError, ConnectionResetError):
                pass  # over the cap: already closed
            strangers.append(sock)
        assert complete(served, PROMPTS[0])  # the deployment serves meanwhile
        assert all(closed_within(sock, 10.0) for sock in strangers)
        for sock in strangers:
            sock.close()
        grown = rss_kb(served.process.pid) - before
        assert grown < 20_000, f"router RSS grew by {grown} kB"
        assert "dropped an unauthenticated control connection" in served.log()
        served.wait_idle()
