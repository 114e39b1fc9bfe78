"""The router's queue: first come first served, and refused at once when it would wait too long.

A real Router on a real event loop; its "workers" are control connections on real sockets
(a socket pair each) whose frames the test reads, with stats the test sets, so the queue's
decisions are driven exactly and nothing depends on engine speed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

import pytest

from hetpd.kv.encodings import format_for
from hetpd.kv.format import ModelFingerprint
from hetpd.sampling_params import SamplingParams
from hetpd.serve.deploy import DeploymentConfig, PoolConfig, RouterConfig
from hetpd.serve.router import Overloaded, Router, WorkerHandle

MODEL = ModelFingerprint("LlamaForCausalLM", num_layers=2, num_kv_heads=4, head_dim=32, rope="{}",
                         tokenizer_hash="t", config_hash="c")


async def worker(router: Router, worker_id: str, role: str, max_num_seqs: int) -> tuple[WorkerHandle, socket.socket]:
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    handle = WorkerHandle(worker_id=worker_id, role=role, pool=role, kv_format=format_for(MODEL, "fp32"),
                          transport="shm", max_num_seqs=max_num_seqs, block_size=16, pages_total=64,
                          max_model_len=512, writer=writer)
    router.workers[worker_id] = handle
    return handle, theirs


def frames(sock: socket.socket) -> list[dict[str, Any]]:
    """Every control frame the router sent to this worker so far."""
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    out = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        out.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


def router(max_queue: int = 8, max_queue_wait_s: float = 15.0) -> Router:
    deploy = DeploymentConfig(router=RouterConfig(max_queue=max_queue, max_queue_wait_s=max_queue_wait_s),
                              pools=[PoolConfig(name="colocated", role="colocated")])
    return Router(deploy, "secret", lambda message: None)


def finish(router: Router, handle: WorkerHandle, request_id: str) -> None:
    wire_id = router.requests[request_id].wire_id
    router._on_output(handle, {"request_id": wire_id, "token_ids": [1], "finished": True, "finish_reason": "length"})


def test_waiting_requests_are_served_in_arrival_order() -> None:
    async def run() -> list[str]:
        r = router()
        handle, peer = await worker(r, "colocated-0", "colocated", max_num_seqs=1)
        first = await r.submit([1, 2, 3], SamplingParams(max_tokens=4))
        order: list[str] = []

        async def later(name: str, tokens: list[int]) -> None:
            state = await r.submit(tokens, SamplingParams(max_tokens=4))
            order.append(name)
            finish(r, handle, state.request_id)

        waiting = [asyncio.create_task(later(f"r{i}", [1] * (i + 1))) for i in range(4)]
        await asyncio.sleep(0.05)
        assert len(r._waiting) == 4 and order == []
        assert r.refusal() is None  # four waiting of eight allowed, no dispatch rate known yet
        finish(r, handle, first.request_id)
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=5)
        peer.close()
        return order

    assert asyncio.run(run()) == ["r0", "r1", "r2", "r3"]


def test_a_queue_that_would_wait_too_long_refuses_at_once() -> None:
    async def run() -> None:
        r = router(max_queue=100, max_queue_wait_s=3.0)
        handle, peer = await worker(r, "colocated-0", "colocated", max_num_seqs=1)
        first = await r.submit([1], SamplingParams(max_tokens=4))
        loop = asyncio.get_running_loop()
        now = loop.time()
        r._dispatched.clear()
        r._dispatched.extend([now - 2.0, now - 1.0, now])  # ~1.5 dispatched per second recently
        queued = [asyncio.create_task(r.submit([1], SamplingParams(max_tokens=4))) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert len(r._waiting) == 4
        reason = r.refusal()
        assert reason is not None and "max_queue_wait_s 3s" in reason
        started = loop.time()
        with pytest.raises(Overloaded, match="max_queue_wait_s"):
            await r.submit([1], SamplingParams(max_tokens=4))
        assert loop.time() - started < 0.05  # refused early, not after waiting
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        assert not r._waiting  # cancelled waiters leave the queue
        finish(r, handle, first.request_id)
        peer.close()

    asyncio.run(run())


def test_max_queue_bounds_the_queue_by_count() -> None:
    async def run() -> None:
        r = router(max_queue=2)
        handle, peer = await worker(r, "colocated-0", "colocated", max_num_seqs=1)
        await r.submit([1], SamplingParams(max_tokens=4))
        queued = [asyncio.create_task(r.submit([1], SamplingParams(max_tokens=4))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match=r"2 requests are queued \(router.max_queue 2\)"):
            await r.submit([1], SamplingParams(max_tokens=4))
        assert [f["op"] for f in frames(peer)] == ["generate"]  # only the first reached the worker
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        peer.close()

    asyncio.run(run())
