"""The router: the worker registry, the boundary check at start-up, and each request's path.

Workers connect to the router's control listener, prove they know the shared secret and
register with their KV format. Every prefill-decode pair is checked with
:func:`hetpd.kv.plan_handoff` as workers join: an incompatible worker is refused with the
fields named; for the others the verdict and conversion site are logged.

A request goes to the least-loaded prefill worker and to the decode worker with the most free
pages that fits it; lease messages between them are relayed here (control plane) while the
KV bytes go worker to worker (data plane). Outputs come back here and feed the request's
event queue, which the HTTP layer streams. Runs on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetpd.kv.format import IncompatibleKVError, KVFormat
from hetpd.kv.plan import HandoffPlan, plan_handoff
from hetpd.sampling_params import SamplingParams
from hetpd.serve.control import ControlError, encode, new_challenge, read_message, verify, write_message
from hetpd.serve.deploy import DeploymentConfig
from hetpd.serve.metrics import Metrics
from hetpd.serve.worker import params_to_dict


class Overloaded(RuntimeError):
    """No worker has room and the queue is full: the client should retry later (HTTP 503)."""


class NotReady(RuntimeError):
    """The deployment has no usable worker set yet (HTTP 503)."""


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
    failed_workers: set[str] = field(default_factory=set)

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
        self._ids = itertools.count()
        self._capacity = asyncio.Event()
        self._queued = 0
        self._server: asyncio.Server | None = None
        self.control_port = 0

    # ------------------------------------------------------------------ control plane
    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve_worker, host, port)
        self.control_port = int(self._server.sockets[0].getsockname()[1])
        return self.control_port

    async def stop(self) -> None:
        for worker in list(self.workers.values()):
            try:
                await write_message(worker.writer, {"op": "shutdown"})
            except (ConnectionError, RuntimeError):
                pass
        if self._server is not None:
            self._server.close()

    def ready(self) -> bool:
        roles = {w.role for w in self.workers.values()}
        return "colocated" in roles or {"prefill", "decode"} <= roles

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker: WorkerHandle | None = None
        try:
            challenge = new_challenge()
            await write_message(writer, {"op": "challenge", "nonce": challenge})
            hello = await asyncio.wait_for(read_message(reader), timeout=30)
            if hello.get("op") != "hello" or not verify(self.secret, challenge, hello.get("mac")):
                self.log("router: refused a control connection that does not know the shared secret")
                await write_message(writer, {"op": "rejected", "reason": "authentication failed"})
                return
            worker = self._admit(hello, writer)
            if worker is None:
                return
            while True:
                await self._on_message(worker, await read_message(reader))
        except (ControlError, asyncio.TimeoutError, ConnectionError) as exc:
            if worker is not None:
                self.log(f"router: worker {worker.worker_id} left ({exc})")
        except asyncio.CancelledError:
            pass  # the router is shutting down
        finally:
            if worker is not None and self.workers.get(worker.worker_id) is worker:
                del self.workers[worker.worker_id]
                self._worker_lost(worker)
            writer.close()

    def _admit(self, hello: dict[str, Any], writer: asyncio.StreamWriter) -> WorkerHandle | None:
        fmt = KVFormat.from_json(str(hello["kv_format"]))
        worker = WorkerHandle(
            worker_id=str(hello["worker_id"]), role=str(hello["role"]), pool=str(hello["pool"]), kv_format=fmt,
            transport=str(hello["transport"]), max_num_seqs=int(hello["max_num_seqs"]),
            block_size=int(hello["block_size"]), pages_total=int(hello["pages_total"]),
            max_model_len=int(hello["max_model_len"]), writer=writer,
        )
        problems = self._pair_problems(worker)
        if worker.worker_id in self.workers:
            problems.append(f"worker id {worker.worker_id!r} is already registered")
        if problems:
            reason = f"worker {worker.worker_id} ({worker.role}) cannot join: " + "; ".join(problems)
            self.log("router: " + reason)
            writer.write(encode({"op": "rejected", "reason": reason}))
            return None
        self.workers[worker.worker_id] = worker
        writer.write(encode({"op": "welcome"}))
        self.log(f"router: {worker.worker_id} joined as {worker.role} ({fmt.dtype} KV, page {fmt.page_size})")
        self._capacity.set()
        return worker

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
                await self._send(target, {"op": "lease", "from": worker.worker_id, "message": message["message"]})
        elif op == "output":
            self._on_output(worker, message)
        elif op == "trace":
            wire_id, step, at = str(message["request_id"]), str(message["step"]), float(message["at"])
            request = self._current(wire_id)
            if request is not None:
                request.mark(step, at)
                if step == "commit":
                    decode = self.workers.get(request.workers.get("decode", ""))
                    if decode is not None:
                        decode.pending_pages.pop(request.request_id, None)
            else:  # the producer's release often lands after the last token: keep it in the finished trace
                record = self.finished_traces.get(wire_id.split("~")[0])
                if record is not None and record.get("wire_id") == wire_id:
                    record["steps"].setdefault(step, at)
        elif op == "lease_ended":
            self.metrics.lease_ended(str(message["side"]), str(message["state"]))
            request = self._current(str(message["request_id"]))
            # A producer lease can expire after the consumer committed (every Committed lost): the
            # request is fine, decoding elsewhere, and the producer merely freed its copy.
            committed = request is not None and "commit" in request.trace
            if request is not None and message["failure"] is not None and not committed:
                await self._recover(request, f"KV handoff failed on the {message['side']} side: "
                                             f"{message['failure']} ({message['detail']})")
        elif op == "error":
            request = self._current(str(message["request_id"]))
            if request is not None:
                self._fail(request, 400, str(message["message"]))

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
        for request_id in list(worker.assigned):
            request = self.requests.get(request_id)
            if request is not None and not request.done:
                request.failed_workers.add(worker.worker_id)
                asyncio.get_running_loop().create_task(
                    self._recover(request, f"{worker.role} worker {worker.worker_id} went away mid-request"))

    # ------------------------------------------------------------------ requests
    async def submit(self, prompt_token_ids: list[int], params: SamplingParams,
                     arrived: float | None = None) -> RequestState:
        """Route a request (``arrived``: when its HTTP request reached us); waits for capacity
        (bounded), else raises Overloaded."""
        if not self.ready():
            raise NotReady("no worker set can serve yet (waiting for prefill and decode workers to register)")
        request = RequestState(f"req-{next(self._ids)}", prompt_token_ids, params, asyncio.Queue())
        request.mark("queued", arrived)
        self._queued += 1
        self.metrics.queue_depth.set(self._queued)
        try:
            workers = await self._place(request)
        finally:
            self._queued -= 1
            self.metrics.queue_depth.set(self._queued)
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
        """Write to a worker; False if its connection is gone (its handler then reports it lost)."""
        try:
            await write_message(worker.writer, message)
            return True
        except (ConnectionError, RuntimeError):
            return False

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
        workers = self._choose(prompt_len, avoid=request.failed_workers)
        if policy.recovery == "recompute":
            decoders = [w for w in self.workers.values() if w.role in ("decode", "colocated")
                        and w.worker_id not in request.failed_workers]
            workers = [max(decoders, key=lambda w: w.free_pages())] if decoders else None
        if workers is None:
            self._fail(request, 503, f"{reason}; no worker left to {policy.recovery} on")
            return
        await self._dispatch(request, workers)

    async def _leave_attempt(self, request: RequestState) -> None:
        """Tell the attempt's surviving workers to drop it (aborting frees its pages and leases)."""
        for worker_id in request.workers.values():
            worker = self.workers.get(worker_id)
            if worker is None:
                continue
            worker.assigned.discard(request.request_id)
            worker.pending_pages.pop(request.request_id, None)
            await self._send(worker, {"op": "abort", "request_id": request.wire_id})

    async def _place(self, request: RequestState) -> list[WorkerHandle]:
        deadline = time.monotonic() + 30.0
        while True:
            chosen = self._choose(len(request.prompt_token_ids))
            if chosen is not None:
                return chosen
            if self._queued > self.deploy.router.max_queue or time.monotonic() > deadline:
                raise Overloaded("every decode worker is full; retry shortly")
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), timeout=max(0.05, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    def _choose(self, num_prompt_tokens: int, avoid: set[str] | None = None) -> list[WorkerHandle] | None:
        avoid = avoid or set()
        by_role: dict[str, list[WorkerHandle]] = {}
        for w in self.workers.values():
            if w.worker_id not in avoid:
                by_role.setdefault(w.role, []).append(w)
        if "colocated" in by_role and not ("prefill" in by_role and "decode" in by_role):
            return [min(by_role["colocated"], key=lambda w: len(w.assigned))]
        prefill = min(by_role.get("prefill", []), key=lambda w: len(w.assigned), default=None)
        fits = [d for d in by_role.get("decode", [])
                if d.free_pages() >= -(-num_prompt_tokens // d.block_size) and len(d.assigned) < d.max_num_seqs]
        if prefill is None or not fits:
            return None
        return [prefill, max(fits, key=lambda d: d.free_pages())]

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
            if worker is not None:
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

