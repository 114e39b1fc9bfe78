"""The router: the worker registry, the boundary check at start-up, and each request's path.

Workers connect to the router's control listener, prove they know the shared secret and
register with their KV format. Every prefill-decode pair is checked with
:func:`hetpd.kv.plan_handoff` as workers join: an incompatible worker is refused with the
fields named; for the others the verdict and conversion site are logged.

A request goes to the least-loaded prefill worker and to the decode worker with the most free
pages that fits it; lease messages between them are relayed here (control plane) while the
KV bytes go worker to worker (data plane). Outputs come back here and feed the request's
event queue, which the HTTP layer streams. Runs on one asyncio loop.

Liveness: every worker sends a heartbeat from a thread of its own. A worker the router has not
heard from for ``supervise.unresponsive_s`` (frozen, or its host gone) gets no new requests and
its requests in flight move elsewhere; while it is heard, the router tells every worker so
(``alive``), which keeps the leases of its handoffs renewed however long its engine steps take.
Each registration of a worker id is a new *epoch*; when one ends, the others are told
(``peer_gone``) and drop what was tied to it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetpd.kv.format import IncompatibleKVError, KVFormat
from hetpd.kv.plan import HandoffPlan, plan_handoff
from hetpd.sampling_params import SamplingParams
from hetpd.serve.control import (
    HANDSHAKE_TIMEOUT_S,
    HELLO_MAX,
    ControlError,
    encode,
    new_challenge,
    read_message,
    verify,
    write_message,
)
from hetpd.serve.deploy import DeploymentConfig
from hetpd.serve.metrics import Metrics
from hetpd.serve.worker import params_to_dict


class Overloaded(RuntimeError):
    """No worker has room and the queue is full: the client should retry later (HTTP 503)."""


class NotReady(RuntimeError):
    """The deployment has no usable worker set yet (HTTP 503)."""


# Connections that have not proved they know the secret yet: each costs a task and a small
# buffer until HANDSHAKE_TIMEOUT_S, so a flood of them is capped.
MAX_UNAUTHENTICATED = 32
DISPATCH_WINDOW_S = 30.0  # the dispatch rate that prices a queue position is measured over this
RETRY_BACKOFF_S = 0.5  # times the attempt number, before retrying on a worker a handoff failed with
ALIVE_HEARTBEATS = 3  # a worker is vouched for while its last heartbeat is this many intervals old at most
MAX_BACKLOG = 16 << 20  # control bytes queued for a worker that reads none: past this it is cut off


@dataclass
class WorkerHandle:
    worker_id: str
    role: str
    pool: str
    kv_format: KVFormat
    transport: str
    max_num_seqs: int
    block_size: int
    pages_total: int
    max_model_len: int
    writer: asyncio.StreamWriter
    epoch: int = 1  # which registration of this worker id (a restarted worker comes back with the next)
    last_heard: float = field(default_factory=time.monotonic)  # any frame from it counts
    responsive: bool = True  # heard within supervise.unresponsive_s: requests may go here
    stats: dict[str, Any] = field(default_factory=dict)
    assigned: set[str] = field(default_factory=set)  # requests routed here and not yet done with it
    pending_pages: dict[str, int] = field(default_factory=dict)  # decode side: pages promised, not yet committed

    def free_pages(self) -> int:
        free = int(self.stats.get("pages_free", self.pages_total))
        return free - sum(self.pending_pages.values())


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    events: asyncio.Queue[dict[str, Any]]
    trace: dict[str, float] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)  # role -> worker id
    output_token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # when each batch of tokens was produced
    done: bool = False
    attempt: int = 0  # workers know an attempt as "<request_id>~<attempt>": a retry never meets stale state
    committed_attempt: int = 0  # the last attempt whose KV the decode worker committed (prefill done with it)
    failed_workers: set[str] = field(default_factory=set)  # gone or unresponsive: never again for this request
    suspects: set[str] = field(default_factory=set)  # the other end of a failed handoff: avoided while others can serve

    @property
    def wire_id(self) -> str:
        return f"{self.request_id}~{self.attempt}"

    def mark(self, step: str, at: float | None = None) -> None:
        self.trace.setdefault(step, time.time() if at is None else at)


class Router:
    def __init__(self, deploy: DeploymentConfig, secret: str, log: Callable[[str], None]) -> None:
        self.deploy = deploy
        self.secret = secret
        self.log = log
        self.workers: dict[str, WorkerHandle] = {}
        self.requests: dict[str, RequestState] = {}
        self.finished_traces: dict[str, dict[str, Any]] = {}
        self.plans: dict[tuple[str, str], HandoffPlan] = {}
        self.metrics = Metrics()
        self._epochs: dict[str, int] = {}  # worker id -> its latest epoch
        self._capacity = asyncio.Event()
        self._waiting: collections.deque[str] = collections.deque()  # queued request ids, oldest first
        self._dispatched: collections.deque[float] = collections.deque()  # when recent requests were placed
        self._unauthenticated = 0
        self._server: asyncio.Server | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.control_port = 0

    # ------------------------------------------------------------------ control plane
    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve_worker, host, port)
        self.control_port = int(self._server.sockets[0].getsockname()[1])
        self._monitor = asyncio.get_running_loop().create_task(self._watch_workers())
        return self.control_port

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for worker in list(self.workers.values()):
            try:
                await write_message(worker.writer, {"op": "shutdown"})
            except (ConnectionError, RuntimeError):
                pass
        if self._server is not None:
            self._server.close()

    def ready(self) -> bool:
        roles = {w.role for w in self.workers.values() if w.responsive}
        return "colocated" in roles or {"prefill", "decode"} <= roles

    def silent_for(self, worker_id: str) -> float | None:
        """Seconds since the router last heard from a registered worker; None if not registered."""
        worker = self.workers.get(worker_id)
        return None if worker is None else time.monotonic() - worker.last_heard

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker: WorkerHandle | None = None
        if self._unauthenticated >= MAX_UNAUTHENTICATED:
            writer.close()  # a flood of strangers: refuse before reading a byte
            return
        self._unauthenticated += 1
        authenticated = False
        try:
            challenge = new_challenge()
            try:  # every way out of the handshake gives its slot back
                await write_message(writer, {"op": "challenge", "nonce": challenge})
                hello = await asyncio.wait_for(read_message(reader, HELLO_MAX), timeout=HANDSHAKE_TIMEOUT_S)
            finally:
                self._unauthenticated -= 1
            if hello.get("op") != "hello" or not verify(self.secret, challenge, hello.get("mac")):
                self.log("router: refused a control connection that does not know the shared secret")
                await write_message(writer, {"op": "rejected", "reason": "authentication failed"})
                return
            authenticated = True
            worker = self._admit(hello, writer)
            if worker is None:
                return
            while True:
                message = await read_message(reader)
                worker.last_heard = time.monotonic()
                if not worker.responsive:
                    worker.responsive = True
                    self.log(f"router: {worker.worker_id} answers again; it gets requests again")
                    self._capacity.set()
                await self._on_message(worker, message)
        except (ControlError, asyncio.TimeoutError, ConnectionError) as exc:
            if worker is not None:
                self.log(f"router: worker {worker.worker_id} left ({exc})")
            elif not authenticated:
                self.log(f"router: dropped an unauthenticated control connection ({exc or 'handshake timed out'})")
        except asyncio.CancelledError:
            pass  # the router is shutting down
        finally:
            if worker is not None and self.workers.get(worker.worker_id) is worker:
                del self.workers[worker.worker_id]
                self._worker_lost(worker)
            writer.close()

    def _admit(self, hello: dict[str, Any], writer: asyncio.StreamWriter) -> WorkerHandle | None:
        try:
            fmt = KVFormat.from_json(str(hello["kv_format"]))
            worker = WorkerHandle(
                worker_id=str(hello["worker_id"]), role=str(hello["role"]), pool=str(hello["pool"]), kv_format=fmt,
                transport=str(hello["transport"]), max_num_seqs=int(hello["max_num_seqs"]),
                block_size=int(hello["block_size"]), pages_total=int(hello["pages_total"]),
                max_model_len=int(hello["max_model_len"]), writer=writer,
            )
        except (KeyError, TypeError, ValueError) as exc:
            writer.write(encode({"op": "rejected", "reason": f"malformed hello: {exc}"}))
            return None
        problems = self._pair_problems(worker)
        if worker.worker_id in self.workers:
            problems.append(f"worker id {worker.worker_id!r} is already registered")
        if problems:
            reason = f"worker {worker.worker_id} ({worker.role}) cannot join: " + "; ".join(problems)
            self.log("router: " + reason)
            writer.write(encode({"op": "rejected", "reason": reason}))
            return None
        worker.epoch = self._epochs.get(worker.worker_id, 0) + 1
        self._epochs[worker.worker_id] = worker.epoch
        self.workers[worker.worker_id] = worker
        writer.write(encode({"op": "welcome", "epoch": worker.epoch}))
        again = f", epoch {worker.epoch}" if worker.epoch > 1 else ""
        self.log(f"router: {worker.worker_id} joined as {worker.role} ({fmt.dtype} KV, page {fmt.page_size}{again})")
        self._capacity.set()
        return worker

    async def _watch_workers(self) -> None:
        """Every heartbeat interval: stop routing to workers gone silent (moving their requests)
        and tell every worker which of its peers are alive (their leases stay renewed)."""
        supervise = self.deploy.supervise
        while True:
            await asyncio.sleep(supervise.heartbeat_s)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if worker.responsive and now - worker.last_heard > supervise.unresponsive_s:
                    worker.responsive = False
                    self.log(f"router: {worker.worker_id} silent for {now - worker.last_heard:.1f}s; no new "
                             f"requests go there and its {len(worker.assigned)} in flight move")
                    self._move_requests_off(worker, f"{worker.role} worker {worker.worker_id} stopped answering")
            # Vouch only for workers heard within a few heartbeats (not unresponsive_s): a frozen
            # worker's leases then run out on their TTL as if it had gone quiet itself.
            heard = {w.worker_id: w.epoch for w in self.workers.values()
                     if now - w.last_heard <= ALIVE_HEARTBEATS * supervise.heartbeat_s}
            alive = {"op": "alive", "workers": heard}
            for worker in list(self.workers.values()):
                if worker.responsive:
                    await self._send(worker, alive)

    def _pair_problems(self, new: WorkerHandle) -> list[str]:
        """Check the newcomer against every worker of the opposite role; log the usable pairs."""
        problems: list[str] = []
        for other in list(self.workers.values()):
            if {new.role, other.role} != {"prefill", "decode"}:
                continue
            producer, consumer = (new, other) if new.role == "prefill" else (other, new)
            if producer.transport != consumer.transport:
                problems.append(f"transport {producer.transport} ({producer.worker_id}) vs {consumer.transport} "
                                f"({consumer.worker_id}): give both pools the same transport")
                continue
            try:
                plan = plan_handoff(producer.kv_format, consumer.kv_format)
            except IncompatibleKVError as exc:
                problems.append(f"with {other.worker_id}: {exc}")
                continue
            self.plans[(producer.worker_id, consumer.worker_id)] = plan
            self.log(f"router: {producer.worker_id} -> {consumer.worker_id}: {plan.verdict.explain()}; "
                     f"conversion site {plan.site}, {plan.wire.bytes_per_token() / 1024:.1f} KiB/token on the wire")
        return problems

    async def _on_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "stats":
            worker.stats = message
            self.metrics.worker_stats(worker.worker_id, worker.role, message)
            self._capacity.set()
        elif op == "lease":
            target = self.workers.get(str(message.get("to")))
            if target is not None:  # a dead target: the lease's TTL ends it on the other side
                await self._send(target, {"op": "lease", "from": worker.worker_id, "from_epoch": worker.epoch,
                                          "message": message["message"]})
        elif op == "output":
            self._on_output(worker, message)
        elif op == "heartbeat":
            pass  # reading the frame was the point (last_heard)
        elif op == "trace":
            wire_id, step, at = str(message["request_id"]), str(message["step"]), float(message["at"])
            request = self._current(wire_id)
            if request is not None:
                request.mark(step, at)
                if step == "commit":
                    request.committed_attempt = request.attempt
                    decode = self.workers.get(request.workers.get("decode", ""))
                    if decode is not None:
                        decode.pending_pages.pop(request.request_id, None)
                    # The decode worker owns the KV now: losing the prefill worker costs this request nothing.
                    prefill = self.workers.get(request.workers.get("prefill", ""))
                    if prefill is not None:
                        prefill.assigned.discard(request.request_id)
            else:  # the producer's release often lands after the last token: keep it in the finished trace
                record = self.finished_traces.get(wire_id.split("~")[0])
                if record is not None and record.get("wire_id") == wire_id:
                    record["steps"].setdefault(step, at)
        elif op == "lease_ended":
            self.metrics.lease_ended(str(message["side"]), str(message["state"]))
            request = self._current(str(message["request_id"]))
            # A producer lease can expire after the consumer committed (every Committed lost): the
            # request is fine, decoding elsewhere, and the producer merely freed its copy.
            committed = request is not None and request.committed_attempt == request.attempt
            if request is not None and message["failure"] is not None and not committed:
                # The worker at the other end of the handoff is the likelier culprit (silent,
                # refusing, sending bad bytes): the next attempt goes elsewhere if it can.
                request.suspects.update(w for w in request.workers.values() if w != worker.worker_id)
                await self._recover(request, f"KV handoff failed on the {message['side']} side: "
                                             f"{message['failure']} ({message['detail']})")
        elif op == "error":
            request = self._current(str(message["request_id"]))
            if request is not None:
                if message.get("retryable"):  # the worker failed, not the request: another attempt may do
                    await self._recover(request, str(message["message"]))
                else:
                    self._fail(request, int(message.get("status", 400)), str(message["message"]))

    def _current(self, wire_id: str) -> RequestState | None:
        """The request a worker message is about, if it is about its current attempt (else stale)."""
        request = self.requests.get(wire_id.split("~")[0])
        if request is None or request.done or request.wire_id != wire_id:
            return None
        return request

    def _on_output(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        request = self._current(str(message["request_id"]))
        if request is None:
            return
        tokens = [int(t) for t in message["token_ids"]]
        at = float(message.get("at", time.time()))  # the worker's clock: its steps order with its trace marks
        if tokens:
            if not request.output_token_ids:
                request.mark("first_token", at)
            elif worker.role == "decode" and "first_decode_token" not in request.trace:
                request.mark("first_decode_token", at)
            request.token_times.append(at)
            request.output_token_ids.extend(tokens)
        request.events.put_nowait({"type": "tokens", "token_ids": tokens, "logprobs": message.get("logprobs")})
        if message.get("finished"):
            request.mark("finished", at)
            request.done = True
            # A retried request's worker saw only the last attempt's tokens: let the API decode them all.
            text = message.get("text") if request.attempt == 1 else None
            request.events.put_nowait({"type": "done", "finish_reason": message.get("finish_reason"),
                                       "stop_reason": message.get("stop_reason"), "text": text})
            self._release(request)

    def _worker_lost(self, worker: WorkerHandle) -> None:
        self.metrics.worker_gone(worker.worker_id, worker.role)
        self._move_requests_off(worker, f"{worker.role} worker {worker.worker_id} went away mid-request")
        gone = encode({"op": "peer_gone", "worker": worker.worker_id, "epoch": worker.epoch})
        for other in self.workers.values():
            if not other.writer.is_closing():
                other.writer.write(gone)

    def _move_requests_off(self, worker: WorkerHandle, reason: str) -> None:
        """Recover every request the worker still had a part in (none whose KV was committed
        elsewhere: those are past the prefill worker)."""
        for request_id in list(worker.assigned):
            request = self.requests.get(request_id)
            if request is None or request.done:
                continue
            if worker.role == "prefill" and request.committed_attempt == request.attempt:
                continue
            request.failed_workers.add(worker.worker_id)
            asyncio.get_running_loop().create_task(self._recover(request, reason))

    # ------------------------------------------------------------------ requests
    async def submit(self, prompt_token_ids: list[int], params: SamplingParams,
                     arrived: float | None = None) -> RequestState:
        """Route a request (``arrived``: when its HTTP request reached us); waits for capacity
        (bounded), else raises Overloaded."""
        if not self.ready():
            raise NotReady("no worker set can serve yet (waiting for prefill and decode workers to register)")
        # Random ids: a request's (and its transfers') id tells a stranger nothing to aim at.
        request = RequestState(f"req-{secrets.token_hex(12)}", prompt_token_ids, params, asyncio.Queue())
        request.mark("queued", arrived)
        workers = await self._place(request)
        self.requests[request.request_id] = request
        request.mark("dispatched")
        await self._dispatch(request, workers)
        return request

    async def _dispatch(self, request: RequestState, workers: list[WorkerHandle]) -> None:
        """Start the next attempt on ``workers``: a colocated worker, a decode worker computing
        everything itself (recompute), or a prefill-decode pair. A later attempt continues after
        the tokens already sent: they join the prompt and leave the budget."""
        request.attempt += 1
        request.workers = {w.role: w.worker_id for w in workers}
        prompt = request.prompt_token_ids + request.output_token_ids
        params = dataclasses.replace(request.params,
                                     max_tokens=request.params.max_tokens - len(request.output_token_ids))
        params_dict = params_to_dict(params)
        for w in workers:
            w.assigned.add(request.request_id)
        if len(workers) == 1:
            sent = await self._send(workers[0], {"op": "generate", "request_id": request.wire_id,
                                                 "prompt_token_ids": prompt, "params": params_dict})
        else:
            prefill, decode = workers
            decode.pending_pages[request.request_id] = -(-len(prompt) // decode.block_size)
            sent = await self._send(decode, {"op": "expect", "request_id": request.wire_id, "params": params_dict})
            sent = sent and await self._send(prefill, {
                "op": "prefill", "request_id": request.wire_id, "prompt_token_ids": prompt, "params": params_dict,
                "decode_worker": decode.worker_id, "decode_format": decode.kv_format.to_json()})
        if not sent:  # a worker vanished between choosing it and telling it
            request.failed_workers.update(w.worker_id for w in workers if w.worker_id not in self.workers)
            await self._recover(request, "a chosen worker went away before the request reached it")

    async def _send(self, worker: WorkerHandle, message: dict[str, Any]) -> bool:
        """Queue a frame to a worker without waiting for it to read (a frozen worker must not
        stall the router); False if its connection is gone. A worker that lets more than
        ``MAX_BACKLOG`` bytes pile up is cut off (its handler then reports it lost)."""
        if worker.writer.is_closing():
            return False
        worker.writer.write(encode(message))
        if worker.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.log(f"router: {worker.worker_id} reads nothing ({MAX_BACKLOG >> 20} MiB waiting); cutting it off")
            worker.writer.close()
            return False
        return True

    async def _recover(self, request: RequestState, reason: str) -> None:
        """An attempt failed: apply the deployment's recovery policy (retry, recompute or fail)."""
        if request.done:
            return
        policy = self.deploy.handoff
        self.log(f"router: {request.request_id} attempt {request.attempt}: {reason}")
        await self._leave_attempt(request)
        if policy.recovery == "fail" or request.attempt >= policy.max_attempts:
            self._fail(request, 502, f"{reason} (recovery {policy.recovery!r}, attempt {request.attempt} of "
                                     f"{policy.max_attempts})")
            return
        request.mark(f"recovery_{request.attempt}")
        prompt_len = len(request.prompt_token_ids) + len(request.output_token_ids)
        workers = self._recovery_workers(prompt_len, request.failed_workers | request.suspects)
        if workers is None and request.suspects - request.failed_workers:
            # Only a suspect is left: it may just have been slow. Give it a moment, then try it again.
            await asyncio.sleep(RETRY_BACKOFF_S * request.attempt)
            if request.done:
                return
            workers = self._recovery_workers(prompt_len, request.failed_workers)
        if workers is None:
            self._fail(request, 503, f"{reason}; no worker left to {policy.recovery} on")
            return
        await self._dispatch(request, workers)

    def _recovery_workers(self, prompt_len: int, avoid: set[str]) -> list[WorkerHandle] | None:
        if self.deploy.handoff.recovery == "recompute":
            decoders = [w for w in self.workers.values() if w.role in ("decode", "colocated") and w.responsive
                        and w.worker_id not in avoid]
            return [max(decoders, key=lambda w: w.free_pages())] if decoders else None
        return self._choose(prompt_len, avoid=avoid)

    async def _leave_attempt(self, request: RequestState) -> None:
        """Tell the attempt's surviving workers to drop it (aborting frees its pages and leases)."""
        for worker_id in request.workers.values():
            worker = self.workers.get(worker_id)
            if worker is None:
                continue
            worker.assigned.discard(request.request_id)
            worker.pending_pages.pop(request.request_id, None)
            await self._send(worker, {"op": "abort", "request_id": request.wire_id})

    def refusal(self) -> str | None:
        """Why a request arriving now would be refused without waiting (None: it may be served
        or queue). Cheap: the API asks before it spends CPU on the request (tokenising)."""
        waiting = len(self._waiting)
        return self._queue_refusal(waiting) if waiting and self.ready() else None

    def _queue_refusal(self, waiting: int) -> str | None:
        """Why a request that must queue behind ``waiting`` others is refused instead (or None)."""
        limit = self.deploy.router.max_queue
        if waiting >= limit:
            return (f"every decode worker is full and {waiting} requests are queued (router.max_queue {limit}); "
                    f"retry shortly")
        rate = self._dispatch_rate()
        wait_limit = self.deploy.router.max_queue_wait_s
        if waiting and rate > 0 and (waiting + 1) / rate > wait_limit:
            return (f"every decode worker is full and the queue would hold this request ~{(waiting + 1) / rate:.0f}s "
                    f"({waiting} ahead, {rate:.1f} dispatched/s), over router.max_queue_wait_s {wait_limit:g}s; "
                    f"retry shortly")
        return None

    def _dispatch_rate(self) -> float:
        """Requests dispatched per second over the recent window (0 when unknown)."""
        now = time.monotonic()
        while self._dispatched and now - self._dispatched[0] > DISPATCH_WINDOW_S:
            self._dispatched.popleft()
        if len(self._dispatched) < 2:
            return 0.0
        return len(self._dispatched) / max(now - self._dispatched[0], 1e-3)

    async def _place(self, request: RequestState) -> list[WorkerHandle]:
        """Workers for a new request, first come first served: a request queues behind those
        already waiting, and only the head of the queue takes capacity as it frees up."""
        if not self._waiting:
            chosen = self._choose(len(request.prompt_token_ids))
            if chosen is not None:
                self._dispatched.append(time.monotonic())
                return chosen
        reason = self._queue_refusal(len(self._waiting))
        if reason is not None:
            raise Overloaded(reason)
        deadline = time.monotonic() + 2 * self.deploy.router.max_queue_wait_s
        self._waiting.append(request.request_id)
        self.metrics.queue_depth.set(len(self._waiting))
        try:
            while True:
                if self._waiting[0] == request.request_id:
                    chosen = self._choose(len(request.prompt_token_ids))
                    if chosen is not None:
                        self._dispatched.append(time.monotonic())
                        return chosen
                if time.monotonic() > deadline:
                    raise Overloaded("no capacity freed up in time; retry shortly")
                self._capacity.clear()
                try:
                    await asyncio.wait_for(self._capacity.wait(), timeout=max(0.05, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting.remove(request.request_id)
            self.metrics.queue_depth.set(len(self._waiting))
            self._capacity.set()  # the next in line looks again

    def _choose(self, num_prompt_tokens: int, avoid: set[str] | None = None) -> list[WorkerHandle] | None:
        avoid = avoid or set()
        by_role: dict[str, list[WorkerHandle]] = {}
        for w in self.workers.values():
            if w.worker_id not in avoid and w.responsive:
                by_role.setdefault(w.role, []).append(w)

        def fits(w: WorkerHandle) -> bool:  # a sequence slot and the prompt's pages (the rest queue here)
            return w.free_pages() >= -(-num_prompt_tokens // w.block_size) and len(w.assigned) < w.max_num_seqs

        if "colocated" in by_role and not ("prefill" in by_role and "decode" in by_role):
            room = [w for w in by_role["colocated"] if fits(w)]
            return [min(room, key=lambda w: len(w.assigned))] if room else None
        prefill = min(by_role.get("prefill", []), key=lambda w: len(w.assigned), default=None)
        decoders = [d for d in by_role.get("decode", []) if fits(d)]
        if prefill is None or not decoders:
            return None
        return [prefill, max(decoders, key=lambda d: d.free_pages())]

    def max_model_len(self) -> int:
        return min((w.max_model_len for w in self.workers.values()), default=0)

    async def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None or request.done:
            return
        request.done = True
        request.mark("aborted")
        await self._leave_attempt(request)
        self._release(request)

    def _fail(self, request: RequestState, status: int, message: str) -> None:
        if request.done:
            return
        request.done = True
        request.mark("failed")
        request.events.put_nowait({"type": "error", "status": status, "message": message})
        for worker_id in request.workers.values():
            worker = self.workers.get(worker_id)
            if worker is not None and not worker.writer.is_closing():
                worker.writer.write(encode({"op": "abort", "request_id": request.wire_id}))
        self._release(request)

    def _release(self, request: RequestState) -> None:
        for worker in self.workers.values():
            worker.assigned.discard(request.request_id)
            worker.pending_pages.pop(request.request_id, None)
        self.metrics.request_done(request.trace)
        if len(request.output_token_ids) > 1 and len(request.token_times) > 1:
            span = request.token_times[-1] - request.token_times[0]
            self.metrics.observe_itl(span / (len(request.output_token_ids) - 1))
        self.finished_traces[request.request_id] = {"workers": dict(request.workers), "steps": dict(request.trace),
                                                    "wire_id": request.wire_id}
        while len(self.finished_traces) > 10000:
            del self.finished_traces[next(iter(self.finished_traces))]
        self.requests.pop(request.request_id, None)
        self._capacity.set()

    def trace(self, request_id: str) -> dict[str, Any] | None:
        request = self.requests.get(request_id)
        if request is not None:
            record: dict[str, Any] = {"workers": dict(request.workers), "steps": dict(request.trace)}
        elif request_id in self.finished_traces:
            record = self.finished_traces[request_id]
        else:
            return None
        ordered = dict(sorted(record["steps"].items(), key=lambda kv: kv[1]))
        return {"request_id": request_id, "workers": record["workers"], "steps": ordered}

