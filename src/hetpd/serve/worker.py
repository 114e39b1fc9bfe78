"""A worker process: one engine (prefill, decode or colocated), driven by the router.

The engine loop runs on the main thread; a reader thread turns control frames into a queue.
Prefill and decode workers hand KV over with :mod:`hetpd.handoff` endpoints: lease messages
travel through the router (control plane), the bytes go straight from worker to worker over
the pool's transport (data plane).

Run by ``hetpd serve`` or by hand: ``hetpd worker --router HOST:PORT --secret S --role decode ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from hetpd.core.step_work import STEP_TRACE_ENV
from hetpd.engine.config import EngineConfig
from hetpd.engine.engine import Engine, StepResult
from hetpd.handoff import ConsumerEndpoint, ProducerEndpoint
from hetpd.kv.format import KVFormat
from hetpd.kv.plan import HandoffPlan, plan_handoff
from hetpd.outputs import Logprob, RequestOutput
from hetpd.ownership import LeaseConfig, ReserveRequest, message_from_dict
from hetpd.sampling_params import SamplingParams
from hetpd.serve.control import answer
from hetpd.serve.chunking import ChunkSizer
from hetpd.serve.credentials import SECRET_ENV, CredentialError, resolve
from hetpd.serve.deploy import HandoffConfig, PoolConfig, SuperviseConfig
from hetpd.transfer import (
    FaultInjection,
    TransferReceiver,
    TransferSender,
    make_receiver,
    make_sender,
)
from hetpd.transfer.core import ReceiverCore
from hetpd.transfer.net import Conn, PeerGone, connect

STATS_EVERY_S = 0.25
FAULTS_ENV = "HETPD_FAULTS"


@dataclass(frozen=True)
class Faults:
    """Deliberate failures for the fault tests, from ``$HETPD_FAULTS`` ("role:name[=value],...").

    Unset in normal runs. Each one makes this real process misbehave the way a crash, a slow
    peer or a bad link would, so the tests exercise the real recovery paths end to end.
    """

    exit_after_offer: bool = False  # prefill: die right after offering the first KV (mid-handoff)
    exit_after_tokens: int | None = None  # decode: die after streaming this many tokens
    corrupt: str | None = None  # prefill: flip a byte of this transfer id ("*": the first one) after hashing it
    stall_on_offer: float | None = None  # decode: freeze the process this long when the first offer arrives
    duplicate_lease_messages: bool = False  # send every lease message twice
    drop_router_after_tokens: int | None = None  # decode: cut the control connection after this many tokens
    slow_step: float | None = None  # sleep this long inside every engine step that runs prompt tokens
    fail_step: bool = False  # the first engine step raises (an engine bug in the middle of a batch)

    @classmethod
    def from_env(cls, role: str, worker_id: str) -> Faults:
        values: dict[str, Any] = {}
        for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
            scope, _, fault = item.partition(":")  # scope: a role or one worker's id
            if scope not in (role, worker_id):
                continue
            name, _, value = fault.partition("=")
            kinds = {"exit_after_tokens": int, "corrupt": str, "stall_on_offer": float, "drop_router_after_tokens": int,
                     "slow_step": float}
            values[name] = kinds[name](value) if name in kinds else True
        return cls(**values)


@dataclass
class _Streamed:
    sent: int = 0  # output tokens already sent to the router


@dataclass
class WorkerState:
    """What the worker knows about its requests (beyond the engine)."""

    params: dict[str, SamplingParams] = field(default_factory=dict)
    decode_worker: dict[str, str] = field(default_factory=dict)  # prefill side: request -> its decode worker
    plans: dict[str, HandoffPlan] = field(default_factory=dict)  # prefill side: request -> plan for its peer
    lease_peer: dict[str, str] = field(default_factory=dict)  # decode side: lease id -> producer worker
    peer_epoch: dict[str, int] = field(default_factory=dict)  # decode side: lease id -> its producer's epoch
    streamed: dict[str, _Streamed] = field(default_factory=dict)


def params_from_dict(raw: dict[str, Any]) -> SamplingParams:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return SamplingParams(**fields)


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def logprobs_to_list(logprobs: tuple[Logprob, ...]) -> list[list[Any]]:
    return [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in logprobs]


class Worker:
    def __init__(self, worker_id: str, pool: PoolConfig, handoff: HandoffConfig, engine: Engine, conn: Conn,
                 advertise_host: str, secret: str, supervise: SuperviseConfig | None = None, epoch: int = 1) -> None:
        self.worker_id = worker_id
        self.epoch = epoch
        self.pool = pool
        self.engine = engine
        self.conn = conn
        self.supervise = supervise or SuperviseConfig()
        self.chunk = ChunkSizer(pool.max_step_s, pool.max_num_batched_tokens) if pool.max_step_s else None
        self.state = WorkerState()
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stopping = threading.Event()
        lease_config = LeaseConfig(ttl=handoff.lease_ttl_s, heartbeat_interval=handoff.heartbeat_s,
                                   retain=6 * handoff.lease_ttl_s)
        self.producer: ProducerEndpoint | None = None
        self.consumer: ConsumerEndpoint | None = None
        self.sender: TransferSender | None = None
        self.receiver: TransferReceiver | None = None
        self.faults = Faults.from_env(pool.role, worker_id)
        if pool.role == "prefill":
            fault = FaultInjection(self.faults.corrupt, 0) if self.faults.corrupt else None
            self.sender = make_sender(pool.transport, fault=fault, key=secret.encode())
            # The plan is re-made per decode peer format; the router sends it with each request.
            self.producer = ProducerEndpoint(engine, self.sender, plan_handoff(engine.kv_format, engine.kv_format),
                                             lease_config, layers_per_post=8)
        elif pool.role == "decode":
            self.receiver = make_receiver(pool.transport, host=advertise_host, key=secret.encode())
            self.consumer = ConsumerEndpoint(engine, self.receiver, self.state.params.__getitem__, lease_config)
        self._last_stats = 0.0
        self._tokens_streamed = 0
        self._step_trace: IO[str] | None = None
        self._iteration_start = 0.0
        for endpoint in (self.producer, self.consumer):
            if endpoint is not None:
                endpoint.on_step = self._trace

    def _trace(self, request_id: str, step: str) -> None:
        self.send({"op": "trace", "request_id": request_id, "step": step, "at": time.time()})

    # ------------------------------------------------------------------ control
    def send(self, message: dict[str, Any]) -> None:
        self.conn.send_json(message)

    def read_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self.inbox.put(self.conn.recv_json(self.stopping.is_set))
        except PeerGone:
            self.inbox.put({"op": "shutdown", "reason": "router connection lost"})

    def heartbeat_loop(self) -> None:
        """Tell the router this process is alive, from a thread of its own: the engine step on
        the main thread may run for seconds (torch releases the GIL), a frozen process cannot."""
        while not self.stopping.wait(self.supervise.heartbeat_s):
            try:
                self.send({"op": "heartbeat"})
            except PeerGone:
                return  # the reader thread sees the loss and shuts the worker down

    def handle(self, message: dict[str, Any], now: float) -> None:
        op = message["op"]
        if op in ("prefill", "generate"):
            request_id = message["request_id"]
            params = params_from_dict(message["params"])
            plan = (plan_handoff(self.engine.kv_format, KVFormat.from_json(message["decode_format"]))
                    if op == "prefill" else None)
            try:
                self.engine.add_request(request_id, list(message["prompt_token_ids"]), params)
            except ValueError as exc:  # refused before anything was kept: nothing to forget
                self.send({"op": "error", "request_id": request_id, "message": str(exc)})
                return
            self.state.params[request_id] = params
            self.state.streamed[request_id] = _Streamed()
            if plan is not None:
                self.state.decode_worker[request_id] = message["decode_worker"]
                self.state.plans[request_id] = plan
        elif op == "alive":
            self._renew_leases(message["workers"], now)
        elif op == "peer_gone":
            self._drop_peer(str(message["worker"]), int(message["epoch"]), now)
        elif op == "expect":
            self.state.params[message["request_id"]] = params_from_dict(message["params"])
            self.state.streamed[message["request_id"]] = _Streamed(sent=1)  # the first token came from prefill
        elif op == "lease":
            lease = message_from_dict(message["message"])
            if self.faults.stall_on_offer and isinstance(lease, ReserveRequest):
                # A frozen decode worker (every thread stopped, heartbeats too), thawed later by a
                # helper process: the offer waits unread and the router stops vouching for it.
                subprocess.Popen(["sh", "-c", f"sleep {self.faults.stall_on_offer}; kill -CONT {os.getpid()}"])
                os.kill(os.getpid(), signal.SIGSTOP)
                self.faults = dataclasses.replace(self.faults, stall_on_offer=None)
                now = time.monotonic()
            if self.consumer is not None:
                self.state.lease_peer[lease.lease_id] = message["from"]
                self.state.peer_epoch[lease.lease_id] = int(message.get("from_epoch", 1))
                self._route(self.consumer.receive(lease, now), now)
            elif self.producer is not None:
                self._route(self.producer.receive(lease, now), now)
        elif op == "abort":
            self.abort(message["request_id"], now)
        elif op == "shutdown":
            self.stopping.set()

    def abort(self, request_id: str, now: float) -> None:
        self.engine.abort(request_id)
        if self.producer is not None and self.producer.leases.get(request_id) is not None:
            self._route(self.producer.abort(request_id, now, "aborted by the client"), now)
        if self.consumer is not None and self.consumer.leases.get(request_id) is not None:
            self._route(self.consumer.abort(request_id, now, "aborted by the client"), now)
        self._forget(request_id)

    def _lease_peers(self) -> list[tuple[ProducerEndpoint | ConsumerEndpoint, dict[str, str]]]:
        """Each endpoint with its table of lease id -> the worker at the other end."""
        if self.producer is not None:
            return [(self.producer, self.state.decode_worker)]
        if self.consumer is not None:
            return [(self.consumer, self.state.lease_peer)]
        return []

    def _renew_leases(self, alive: dict[str, int], now: float) -> None:
        """The router hears these workers: the leases shared with them stay alive however long
        either side's engine steps take (their own messages may wait behind a step)."""
        for endpoint, peers in self._lease_peers():
            endpoint.leases.renew([lease for lease, peer in peers.items() if peer in alive], now)

    def _drop_peer(self, worker_id: str, epoch: int, now: float) -> None:
        """A worker incarnation left: end every live lease with it now rather than after a TTL
        (the router also retries its requests; this frees what the router no longer tracks)."""
        for endpoint, peers in self._lease_peers():
            for lease_id, peer in list(peers.items()):
                if peer != worker_id or self.state.peer_epoch.get(lease_id, epoch) > epoch:
                    continue
                lease = endpoint.leases.get(lease_id)
                if lease is not None and lease.live:
                    self._route(endpoint.abort(lease_id, now, f"peer {worker_id} (epoch {epoch}) left"), now)

    def _route(self, messages: list[Any], now: float) -> None:
        for m in messages:
            if self.producer is not None:
                to = self.state.decode_worker.get(m.lease_id)
            else:
                to = self.state.lease_peer.get(m.lease_id)
            if to is not None:
                for _ in range(2 if self.faults.duplicate_lease_messages else 1):
                    self.send({"op": "lease", "to": to, "from": self.worker_id, "message": m.to_dict()})

    def _forget(self, request_id: str) -> None:
        self.state.params.pop(request_id, None)
        self.state.streamed.pop(request_id, None)
        self.state.plans.pop(request_id, None)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        threading.Thread(target=self.read_loop, name="hetpd-worker-control", daemon=True).start()
        threading.Thread(target=self.heartbeat_loop, name="hetpd-worker-heartbeat", daemon=True).start()
        trace_dir = os.environ.get(STEP_TRACE_ENV)
        self._step_trace = open(os.path.join(trace_dir, f"{self.worker_id}.jsonl"), "a", buffering=1) if trace_dir else None
        while not self.stopping.is_set():
            # Engine work: never wait. Only handoffs in flight: wake often enough to poll the transport
            # (2 ms) without spinning a core the engines next door need. Idle: 20 ms.
            wait = 0.0 if self.engine.has_unfinished() else 0.002 if self._live_leases() else 0.02
            try:
                message: dict[str, Any] | None = self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait()
            except queue.Empty:
                message = None
            self._iteration_start = time.monotonic()  # waiting for a message is idleness, not the loop's work
            try:
                while message is not None:
                    self._handle_safely(message)
                    message = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.stopping.is_set():
                break
            self.step(time.monotonic())

    def _handle_safely(self, message: dict[str, Any]) -> None:
        """A malformed control message is reported, never fatal to the worker's other requests."""
        try:
            self.handle(message, time.monotonic())
        except (KeyError, TypeError, ValueError) as exc:
            self.send({"op": "error", "request_id": str(message.get("request_id", "")),
                       "message": f"worker {self.worker_id} could not handle {message.get('op')!r}: {exc}"})

    def step(self, now: float) -> None:
        record: dict[str, Any] | None = None
        if self.engine.has_unfinished():
            cpu = time.thread_time()
            result = self._engine_step()
            if result is None:
                return
            if self.chunk is not None and result.work.prefill_tokens:
                self.engine.scheduler.config = dataclasses.replace(
                    self.engine.scheduler.config,
                    max_num_batched_tokens=self.chunk.observe(result.work.prefill_tokens, time.monotonic() - now))
            if self._step_trace is not None and result.num_batched_tokens:
                # Wall and this thread's CPU time of the engine step, with the work it did: the
                # served steps the planner's step model can be checked (or fitted) against.
                record = {"at": now, "wall": time.monotonic() - now, "cpu": time.thread_time() - cpu,
                          "work": list(dataclasses.astuple(result.work))}
            for out in result.finished:
                self._send_output(out.request_id, out)
            for out in result.handed_off:
                # Take the request's plan (its decode peer's wire format) before sending the first
                # token forgets the request here: without it the KV would cross in this worker's
                # own format, e.g. fp32 where the plan quantises to int8 on this side.
                plan = self.state.plans.pop(out.request_id, None)
                self._send_output(out.request_id, out, handed_off=True)
                assert self.producer is not None
                self._route(self.producer.offer(out.request_id, now, plan), now)
                if self.faults.exit_after_offer:
                    os._exit(17)
            for request_id in result.sampled:
                if request_id in self.state.streamed and request_id not in {o.request_id for o in result.finished}:
                    if self.pool.role != "prefill":
                        self._stream(request_id)
        for endpoint in (self.producer, self.consumer):
            if endpoint is not None:
                self._route(endpoint.poll(now), now)
                self._route(endpoint.tick(now), now)
                for event in endpoint.events():
                    if event.failure is not None and endpoint is self.consumer:
                        self._forget(event.request_id)
                    self.send({"op": "lease_ended", "request_id": event.request_id, "side": endpoint.side.value,
                               "state": event.state.value, "failure": event.failure.value if event.failure else None,
                               "detail": event.detail})
        if self.consumer is not None:
            for out in self.consumer.finished():
                self._send_output(out.request_id, out)
        if now - self._last_stats > STATS_EVERY_S:
            self._last_stats = now
            self._prune_routes()
            self.send(self.stats())
        if record is not None and self._step_trace is not None:
            # The loop's own work around the step, which no step model prices: control messages
            # read before it ("before"), and outputs, offers, transfers and leases after it.
            record["before"] = now - self._iteration_start
            record["after"] = time.monotonic() - now - record["wall"]
            self._step_trace.write(json.dumps(record) + "\n")

    def _engine_step(self) -> StepResult | None:
        """One engine step; if it raises (an engine bug, never bad input: that is refused at
        add_request), the requests it was running are dropped here and handed back to the
        router to retry elsewhere, and the worker goes on serving the rest."""
        scheduler = self.engine.scheduler
        in_step = [seq.seq_id for seq in (*scheduler.running, *scheduler.waiting)]
        try:
            if self.faults.fail_step:
                self.faults = dataclasses.replace(self.faults, fail_step=False)
                raise RuntimeError("injected engine failure")
            if self.faults.slow_step and scheduler.waiting:
                time.sleep(self.faults.slow_step)
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - contain any engine failure to its requests
            print(f"worker {self.worker_id}: engine step failed ({type(exc).__name__}: {exc}); dropping its "
                  f"{len(in_step)} request(s) for the router to retry", file=sys.stderr, flush=True)
            for request_id in in_step:
                self.engine.abort(request_id)
                self._forget(request_id)
                self.send({"op": "error", "request_id": request_id, "retryable": True, "status": 500,
                           "message": f"worker {self.worker_id}: engine step failed ({type(exc).__name__}: {exc})"})
            return None

    def _stream(self, request_id: str) -> None:
        token_ids, logprobs = self.engine.progress(request_id)
        streamed = self.state.streamed[request_id]
        if len(token_ids) > streamed.sent:
            self.send({"op": "output", "request_id": request_id, "at": time.time(),
                       "token_ids": list(token_ids[streamed.sent:]),
                       "logprobs": logprobs_to_list(logprobs[streamed.sent:]) if logprobs else None,
                       "finished": False})
            self._tokens_streamed += len(token_ids) - streamed.sent
            streamed.sent = len(token_ids)
            if self.faults.exit_after_tokens is not None and self._tokens_streamed >= self.faults.exit_after_tokens:
                os._exit(17)
            drop = self.faults.drop_router_after_tokens
            if drop is not None and self._tokens_streamed >= drop:
                self.conn.sock.shutdown(socket.SHUT_RDWR)  # the link dies; the process lives on

    def _send_output(self, request_id: str, out: RequestOutput, handed_off: bool = False) -> None:
        streamed = self.state.streamed.get(request_id, _Streamed())
        completion = out.outputs[0]
        logprobs = completion.logprobs or ()
        self.send({
            "op": "output", "request_id": request_id, "at": time.time(),
            "token_ids": list(completion.token_ids[streamed.sent:]),
            "logprobs": logprobs_to_list(logprobs[streamed.sent:]) if completion.logprobs is not None else None,
            "finished": out.finished, "handed_off": handed_off, "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason, "text": completion.text if out.finished else None,
            "num_prompt_tokens": len(out.prompt_token_ids), "num_cached_tokens": out.metrics.num_cached_tokens,
        })
        streamed.sent = len(completion.token_ids)
        if out.finished or handed_off:
            self._forget(request_id)

    def _prune_routes(self) -> None:
        """Forget where to send lease messages once the lease table itself forgot the lease."""
        for routes, endpoint in ((self.state.decode_worker, self.producer), (self.state.lease_peer, self.consumer)):
            if endpoint is None:
                continue
            for lease_id in [k for k in routes if endpoint.leases.get(k) is None and k not in self.state.params]:
                del routes[lease_id]
                self.state.peer_epoch.pop(lease_id, None)

    def _live_leases(self) -> int:
        return sum(e.live_leases() for e in (self.producer, self.consumer) if e is not None)

    def stats(self) -> dict[str, Any]:
        allocator = self.engine.allocator.stats()
        ledgers = [e.ledger.snapshot() for e in (self.producer, self.consumer) if e is not None]
        return {
            "op": "stats", "pages_in_use": allocator.num_in_use, "pages_total": self.engine.allocator.num_blocks,
            "pages_free": self.engine.allocator.num_available(), "running": len(self.engine.scheduler.running),
            "waiting": len(self.engine.scheduler.waiting), "live_leases": self._live_leases(),
            "held": len(self.engine.held_request_ids()), "reserved": len(self.engine.reserved_request_ids()),
            "transient_bytes": sum(s.total_bytes for s in ledgers),
            "peak_transient_bytes": max((s.peak_total_bytes for s in ledgers), default=0),
            "kv_bytes_received": self.consumer.bytes_received if self.consumer is not None else 0,
            "epoch": self.epoch,
            "max_num_batched_tokens": self.engine.scheduler.config.max_num_batched_tokens,
        }

    def close(self) -> None:
        if self._step_trace is not None:
            self._step_trace.close()
        for endpoint in (self.sender, self.receiver):
            if endpoint is not None:
                endpoint.close()
        self.conn.close()


def engine_config(pool: PoolConfig, model: str | None) -> EngineConfig:
    return EngineConfig(
        model=model, role=pool.role, device=pool.device, dtype=pool.dtype, quantization=pool.quantization,
        kv_cache_dtype=pool.kv_cache_dtype, block_size=pool.block_size, num_kv_blocks=pool.num_kv_blocks,
        kv_cache_memory_bytes=int(pool.kv_cache_memory_gb * (1 << 30)), max_num_seqs=pool.max_num_seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens,
    )


def serve_worker(router: str, secret: str, worker_id: str, pool: PoolConfig, handoff: HandoffConfig,
                 model: str | None, advertise_host: str = "127.0.0.1", supervise: SuperviseConfig | None = None,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
    """Load the engine, join the router, serve until told to stop (or the router goes away)."""
    threads = os.environ.get("HETPD_TORCH_THREADS")
    if threads:  # several workers on one host: oversubscribed torch threads slow every one of them down
        import torch

        torch.set_num_threads(max(1, int(threads)))
    engine = Engine.from_config(engine_config(pool, model))
    host, port = router.rsplit(":", 1)
    conn = connect(host, int(port), timeout=10.0, io_timeout=30.0)
    challenge = conn.recv_json(lambda: False)
    if challenge.get("op") != "challenge":
        raise PeerGone(f"router spoke {challenge.get('op')!r} first, expected a challenge")
    conn.send_json({
        "op": "hello", "mac": answer(secret, str(challenge["nonce"])), "worker_id": worker_id, "role": pool.role,
        "pool": pool.name, "pid": os.getpid(), "host": socket.gethostname(), "kv_format": engine.kv_format.to_json(),
        "transport": pool.transport, "max_num_seqs": pool.max_num_seqs, "block_size": engine.kv_cache.block_size,
        "pages_total": engine.allocator.num_blocks, "max_model_len": engine.max_model_len,
    })
    reply = conn.recv_json(lambda: False)
    if reply.get("op") != "welcome":
        log(f"worker {worker_id}: the router refused to register it: {reply.get('reason')}")
        conn.close()
        raise SystemExit(3)
    epoch = int(reply.get("epoch", 1))
    again = f" (epoch {epoch})" if epoch > 1 else ""
    log(f"worker {worker_id} ({pool.role}, {pool.dtype} weights, {pool.kv_cache_dtype} KV) joined {router}{again}")
    worker = Worker(worker_id, pool, handoff, engine, conn, advertise_host, secret, supervise, epoch)
    where = worker.receiver.address() if isinstance(worker.receiver, ReceiverCore) else {}
    if "port" in where:
        log(f"worker {worker_id}: KV receiver ({pool.transport}) on {where.get('host')}:{where.get('port')}, "
            f"senders must prove the shared secret")
    try:
        worker.run()
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hetpd worker", description="Run one prefill, decode or colocated worker.")
    parser.add_argument("--router", required=True, help="HOST:PORT of the router's control listener")
    parser.add_argument("--secret-file", default=None, help="a file holding the shared secret (mode 600), e.g. the "
                                                             "one `hetpd serve` prints; or set $HETPD_SECRET")
    parser.add_argument("--secret", default=None, help="the shared secret itself (visible in `ps`: prefer "
                                                        "--secret-file or $HETPD_SECRET)")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--pool", default=None, help="the pool as JSON (what `hetpd serve` passes)")
    parser.add_argument("--handoff", default="{}", help="handoff settings as JSON")
    parser.add_argument("--supervise", default="{}", help="heartbeat settings as JSON (the deployment's supervise:)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--role", choices=["prefill", "decode", "colocated"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default="float32")
    parser.add_argument("--transport", default="shm")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--advertise-host", default="127.0.0.1", help="address other workers reach this one at")
    args = parser.parse_args(argv)
    try:
        secret = args.secret or resolve(None, args.secret_file, SECRET_ENV, "--secret-file")
    except CredentialError as exc:
        parser.error(str(exc))
    if not secret:
        parser.error("--secret-file (or $HETPD_SECRET) is required: the router only accepts workers that know it")
    if args.pool:
        pool = PoolConfig.model_validate_json(args.pool)
    elif args.role:
        pool = PoolConfig(name=args.role, role=args.role, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                          transport=args.transport, num_kv_blocks=args.num_kv_blocks)
    else:
        parser.error("give --role (or --pool)")
    worker_id = args.worker_id or f"{pool.name}-{socket.gethostname()}-{os.getpid()}"
    serve_worker(args.router, secret, worker_id, pool, HandoffConfig.model_validate(json.loads(args.handoff)),
                 args.model, args.advertise_host, SuperviseConfig.model_validate(json.loads(args.supervise)))


if __name__ == "__main__":
    main()
