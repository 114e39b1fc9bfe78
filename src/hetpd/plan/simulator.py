"""A discrete-event simulation of a disaggregated deployment, on the runtime's own decision code.

Each simulated prefill and decode instance runs hetpd's real :class:`~hetpd.core.scheduler.Scheduler`
and :class:`~hetpd.core.block_allocator.BlockAllocator`; every handoff runs the real lease state
machines of :mod:`hetpd.ownership` (offer, reserve, transfer, commit, release) with simulated
time. Only the durations come from a model: a step takes what its pool's step coster says for
its batch (the catalog roofline, or step times ``hetpd profile`` measured), a transfer what the
link and the wire format say. A colocated deployment (``SimConfig.colocated``) runs whole
requests on the prefill pool's instances: chunked prefill mixed with decodes, no handoff.
Lease time-outs are ticked as the runtime ticks them. For a local deployment it can also model
what ``hetpd serve`` does beyond the durations: workers that read lease messages only between
their engine steps, after the router's hop (``control_at_step_boundaries``,
``control_latency_s``), workers on one host that slow each other (``PoolSpec.interference``),
and the worker loop's own time around each step (``PoolSpec.loop``). The fast simulator
(:mod:`hetpd.plan.fastsim`) refuses those. Pure Python.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import partial

from hetpd.bench.metrics import SLO, Distribution
from hetpd.bench.workload import RequestSpec
from hetpd.core.block_allocator import BlockAllocator
from hetpd.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from hetpd.core.sequence import Sequence
from hetpd.core.step_work import step_work
from hetpd.ownership import (
    Admit,
    AdoptBlocks,
    CapacityLedger,
    ConsumerLeases,
    Ended,
    FreeBlocks,
    LeaseConfig,
    Message,
    ProducerLeases,
    ReserveRequest,
    Send,
    Side,
    StartTransfer,
    Step,
    Tick,
    TransferOutcome,
)
from hetpd.plan.cost import Efficiency, handoff_time, kv_bytes_per_token
from hetpd.plan.spec import Accelerator, Link, ModelShape
from hetpd.plan.step_model import LoopCost, MeasuredSteps, RooflineSteps, StepCoster


@dataclass(frozen=True)
class PoolSpec:
    accelerator: Accelerator
    count: int
    compute_fmt: str = "bf16"
    weight_fmt: str = "bf16"
    kv_fmt: str = "bf16"
    kv_pool_tokens: int = 200_000
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192
    steps: MeasuredSteps | None = None  # measured step times (``hetpd profile``); None: the roofline
    # The roofline's achieved fractions of peak on this pool's accelerator (a calibration's, see
    # plan.calibrated); None: the config's (catalog defaults).
    efficiency: Efficiency | None = None
    # A step runs (1 + interference) times as long when another instance of the deployment is
    # mid-step as it starts: instances sharing one host's memory bandwidth and caches (fitted by
    # `hetpd profile --served-steps`, hetpd.plan.served_steps). 0: instances never slow each other.
    interference: float = 0.0
    # The worker loop's own time around each step (control messages, streaming, KV export and
    # staging, leases), in which the instance starts no step; fitted to served steps like the
    # interference. None of it by default.
    loop: LoopCost = LoopCost()

    def slowed(self, seconds: float, beside_busy: bool) -> float:
        """A step's engine time when another instance was (or was not) mid-step as it started."""
        return seconds * (1.0 + self.interference) if beside_busy else seconds


@dataclass(frozen=True)
class SimConfig:
    model: ModelShape
    prefill: PoolSpec
    decode: PoolSpec
    link: Link
    wire_fmt: str = "bf16"
    page_tokens: int = 16
    conversion_gbps: float | None = None
    efficiency: Efficiency = Efficiency()
    colocated: bool = False  # the prefill pool serves whole requests; decode pool and link unused
    handoff_overhead_s: float = 0.0  # fixed cost of one handoff beyond the link (control round trips, staging)
    # Lease messages and transfer completions reach a worker between its engine steps, as in
    # `hetpd serve` (one loop per worker: step, then its inbox): a grant that reaches a prefill
    # worker in the middle of a 500 ms prompt waits for it. False: at once (the fast simulator's
    # model, which refuses True).
    control_at_step_boundaries: bool = False
    # Seconds a lease message takes from one worker to the other (through the router): long
    # enough that a worker which just finished a step has started its next one when a reply
    # comes. 0: at once.
    control_latency_s: float = 0.0


@dataclass
class RequestTimes:
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    finished: float | None = None
    handoff_start: float | None = None
    handoff_end: float | None = None

    def token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.num_tokens += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (as ``hetpd bench`` reports it)."""
        if self.first_token is None or self.last_token is None or self.num_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.num_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass(frozen=True)
class SimResult:
    requests: tuple[RequestTimes, ...]
    duration_s: float
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    goodput: float  # requests per second meeting the SLO
    throughput: float  # finished requests per second
    prefill_utilisation: float  # busy fraction, averaged over instances
    decode_utilisation: float
    link_utilisation: float
    peak_transient_bytes: int  # KV held on both sides for handoffs at once (the ledger's peak)
    binding: str  # the busiest resource: "prefill compute", "decode" or "link"
    retries: int  # handoffs refused for lack of decode room, prefilled again later
    expired: int = 0  # leases that timed out
    preemptions: int = 0  # sequences a scheduler evicted to make room (recomputed later)


class _Instance:
    def __init__(self, name: str, pool: PoolSpec, config: SimConfig, hands_off: bool) -> None:
        blocks = max(1, pool.kv_pool_tokens // config.page_tokens)
        self.name = name
        self.hands_off = hands_off  # a prefill instance of a disaggregated deployment: first token, then handoff
        self.pool = pool
        self.allocator = BlockAllocator(blocks, config.page_tokens, enable_prefix_caching=False)
        self.scheduler = Scheduler(SchedulerConfig(pool.max_num_seqs, pool.max_batch_tokens), self.allocator)
        self.coster = pool_coster(config, pool)
        self.current: SchedulerOutput | None = None
        self.loop_s = 0.0  # the current step's loop time, after its engine time (PoolSpec.loop)
        self.inbox: list[Callable[[float], None]] = []  # control work waiting for the current step to end
        self.busy_time = 0.0
        self.reserving: set[str] = set()  # handoffs admitted here whose KV has not landed: slots taken


def pool_roofline(config: SimConfig, pool: PoolSpec) -> RooflineSteps:
    """``pool``'s roofline step model, at its own efficiency where calibrated, else the config's."""
    return RooflineSteps(config.model, pool.accelerator, pool.compute_fmt, pool.weight_fmt, pool.kv_fmt,
                         pool.efficiency or config.efficiency)


def pool_coster(config: SimConfig, pool: PoolSpec) -> StepCoster:
    """What prices ``pool``'s steps: its measured step model, else its roofline."""
    return pool.steps or pool_roofline(config, pool)


def _request_of(transfer_id: str) -> str:
    """The request a transfer id (``str(LeaseKey)``: ``<lease id>@<epoch>``) moves; the simulator
    opens each lease under its request's id."""
    return transfer_id.rsplit("@", 1)[0]


def check_pools(config: SimConfig) -> None:
    """A deployment to simulate has at least one instance in each pool it uses."""
    if config.prefill.count < 1:
        raise ValueError(f"prefill.count: a deployment needs at least one instance, got {config.prefill.count}")
    if not config.colocated and config.decode.count < 1:
        raise ValueError(f"decode.count: a disaggregated deployment needs at least one decode instance, "
                         f"got {config.decode.count}")


class _Simulation:
    """One run's mutable state; :func:`simulate` is the entry point."""

    def __init__(self, config: SimConfig, requests: Seq[RequestSpec], lease: LeaseConfig | None) -> None:
        check_pools(config)
        self.cfg = config
        self.prefill = [_Instance(f"prefill-{i}", config.prefill, config, hands_off=not config.colocated)
                        for i in range(config.prefill.count)]
        self.decode = [] if config.colocated else [_Instance(f"decode-{i}", config.decode, config, hands_off=False)
                                                    for i in range(config.decode.count)]
        self.by_name = {i.name: i for i in self.prefill + self.decode}
        self.producers, self.consumers = ProducerLeases(lease), ConsumerLeases(lease)
        self.ledger = CapacityLedger()
        self.specs = {str(r.index): r for r in requests}
        self.times = {str(r.index): RequestTimes(r.at or 0.0) for r in requests}
        self.producer_of: dict[str, _Instance] = {}
        self.target: dict[str, _Instance] = {}
        self.attempts: dict[str, int] = {}
        self.refused: list[str] = []  # handoffs the decode pool had no room for: prefilled again later
        self.events: list[tuple[float, int, str, str]] = []
        self.order = itertools.count()
        self.link_free_at = 0.0
        self.link_busy = 0.0
        self.retries = 0
        self.expired = 0
        self.preemptions = 0
        self.ticking = False
        self.in_flight: dict[str, tuple[_Instance | None, Callable[[float], None]]] = {}  # lease messages on the way
        for r in requests:
            self.push(r.at or 0.0, "arrive", str(r.index))

    def push(self, at: float, kind: str, key: str) -> None:
        heapq.heappush(self.events, (at, next(self.order), kind, key))

    # ------------------------------------------------------------------ the loop
    def run_until(self, horizon_s: float) -> float:
        now = 0.0
        while self.events and self.events[0][0] <= horizon_s:
            now, _, kind, key = heapq.heappop(self.events)
            if kind == "arrive":
                chosen = min(self.prefill, key=lambda p: len(p.scheduler.waiting) + len(p.scheduler.running))
                spec = self.specs[key]
                chosen.scheduler.add(Sequence(key, [0] * spec.input_tokens, spec.input_tokens, spec.output_tokens))
                self.producer_of[key] = chosen
                self.kick(chosen, now)
            elif kind == "transfer_done":
                request_id = _request_of(key)
                self.between_steps(self.producer_of.get(request_id), now, partial(self.settled, Side.PRODUCER, key))
                self.between_steps(self.target.get(request_id), now, partial(self.settled, Side.CONSUMER, key))
            elif kind == "step":
                self.start_step(self.by_name[key], now)
            elif kind == "step_done":
                self.finish_step(self.by_name[key], now)
            elif kind == "tick":
                self.tick(now)
            elif kind == "deliver":
                worker, action = self.in_flight.pop(key)
                self.between_steps(worker, now, action)
        return now

    def send(self, worker: _Instance | None, now: float, action: Callable[[float], None]) -> None:
        """A lease message to ``worker``: it arrives after the control latency, then waits for the
        worker to be between steps."""
        if self.cfg.control_latency_s > 0:
            key = str(next(self.order))
            self.in_flight[key] = (worker, action)
            self.push(now + self.cfg.control_latency_s, "deliver", key)
        else:
            self.between_steps(worker, now, action)

    def tick(self, now: float) -> None:
        """What a worker's lease timer does: keepalives, expiry, forgetting old leases."""
        for side in (Side.PRODUCER, Side.CONSUMER):
            ticked = self.leases(side).tick(now)
            self.expired += len(ticked.expired)
            self.apply(side, ticked, now)
        self.ticking = self.producers.live() + self.consumers.live() > 0
        if self.ticking:
            self.push(now + self.producers.config.heartbeat_interval, "tick", "")

    def between_steps(self, worker: _Instance | None, now: float, action: Callable[[float], None]) -> None:
        """Run ``action`` when ``worker`` is between engine steps: now if it is idle (or unknown, or
        the config delivers control at once), else when its current step ends."""
        if worker is None or worker.current is None or not self.cfg.control_at_step_boundaries:
            action(now)
        else:
            worker.inbox.append(action)

    def kick(self, instance: _Instance, now: float) -> None:
        if instance.current is None and instance.scheduler.has_work:
            self.push(now, "step", instance.name)

    def start_step(self, inst: _Instance, now: float) -> None:
        if inst.current is not None:
            return
        output = inst.scheduler.schedule()
        if output.is_empty:
            return
        self.preemptions += len(output.preempted)
        work = step_work(output)
        beside_busy = any(other.current is not None for other in self.by_name.values())  # (inst is idle: starting)
        seconds = inst.pool.slowed(inst.coster.seconds(work), beside_busy)
        # The worker loop's own work follows the engine step (the served loop streams the step's
        # tokens first, then offers, polls and ticks): the instance stays busy, its tokens do not wait.
        inst.loop_s = inst.pool.loop.seconds(work)
        seconds += inst.loop_s
        inst.current = output
        inst.busy_time += seconds
        self.push(now + seconds, "step_done", inst.name)

    def finish_step(self, inst: _Instance, now: float) -> None:
        output, inst.current = inst.current, None
        assert output is not None
        emitted = now - inst.loop_s  # the engine's part of the step ended then; tokens left with it
        sampling = [c for c in output.chunks if c.samples]  # before on_step_done moves the watermark
        inst.scheduler.on_step_done(output, {c.seq.seq_id: 0 for c in sampling})
        for chunk in sampling:
            request_id, seq = chunk.seq.seq_id, chunk.seq
            times, spec = self.times[request_id], self.specs[request_id]
            if not (inst.hands_off and times.first_token is not None):  # a re-prefill's token was sent already
                times.token(emitted)
            if inst.hands_off:
                blocks = inst.scheduler.finish(seq, keep_blocks=True)
                if spec.output_tokens <= 1:
                    inst.allocator.free(blocks)
                    times.finished = emitted
                else:
                    self.offer(request_id, blocks, now)
            elif seq.num_output_tokens >= spec.output_tokens:
                inst.scheduler.finish(seq)
                times.finished = emitted
                while self.refused:  # room freed: the refused ones get another go
                    self.push(now, "arrive", self.refused.pop(0))
        inbox, inst.inbox = inst.inbox, []
        for action in inbox:  # the worker's loop: after the step, its control messages, then the next step
            action(now)
        self.kick(inst, now)

    # ------------------------------------------------------------------ handoffs (the real leases)
    def offer(self, request_id: str, blocks: list[int], now: float) -> None:
        epoch = self.attempts.get(request_id, 0) + 1
        self.attempts[request_id] = epoch
        nbytes = int(kv_bytes_per_token(self.cfg.model, self.cfg.prefill.kv_fmt) * self.specs[request_id].input_tokens)
        self.apply(Side.PRODUCER, self.producers.open(request_id, request_id, len(blocks), nbytes, now, epoch), now)
        self.apply(Side.PRODUCER, self.producers.hold(request_id, blocks, nbytes, now), now)
        if not self.ticking:
            self.ticking = True
            self.push(now + self.producers.config.heartbeat_interval, "tick", "")

    def apply(self, side: Side, step: Step | Tick, now: float) -> None:
        """Carry out lease effects. Control messages take ``control_latency_s`` (the link carries only
        bytes); the receiving worker reads them between its steps (:meth:`between_steps`)."""
        self.ledger.apply(side, step.effects)
        starts: list[str] = []
        for effect in step.effects:
            if isinstance(effect, Send):
                message = effect.message
                if side is Side.PRODUCER:
                    # Before admission the consumer is not chosen yet; with one decode worker it is that one.
                    to = self.target.get(message.lease_id) or (self.decode[0] if len(self.decode) == 1 else None)
                    self.send(to, now, partial(self.deliver, Side.CONSUMER, message))
                else:
                    self.send(self.producer_of.get(message.lease_id), now, partial(self.deliver, Side.PRODUCER, message))
            elif isinstance(effect, Admit):
                self.admit(effect.offer, now)
            elif isinstance(effect, StartTransfer) and effect.direction == "send":
                starts.append(effect.transfer_id)  # after the notice of it is on its way (below)
            elif isinstance(effect, FreeBlocks):
                owner = self.producer_of if side is Side.PRODUCER else self.target
                instance = owner.get(effect.lease.lease_id)
                if instance is not None:
                    instance.allocator.free(list(effect.block_ids))
                    if side is Side.PRODUCER:
                        self.kick(instance, now)  # queued prompts may fit now
                    elif not effect.refused:
                        instance.reserving.discard(effect.lease.lease_id)
            elif isinstance(effect, AdoptBlocks):
                self.commit(effect.request_id, list(effect.block_ids), now)
            elif isinstance(effect, Ended) and side is Side.PRODUCER and effect.failure is not None:
                self.retries += 1
                self.refused.append(effect.request_id)
        for transfer_id in starts:
            self.transfer(transfer_id, now)

    def leases(self, side: Side) -> ProducerLeases | ConsumerLeases:
        return self.consumers if side is Side.CONSUMER else self.producers

    def deliver(self, to: Side, message: Message, now: float) -> None:
        self.apply(to, self.leases(to).receive(message, now), now)

    def settled(self, side: Side, transfer_id: str, now: float) -> None:
        self.apply(side, self.leases(side).transfer_settled(transfer_id, TransferOutcome.COMPLETED, now), now)

    def admit(self, offer: ReserveRequest, now: float) -> None:
        spec = self.specs[offer.request_id]
        need = -(-spec.input_tokens // self.cfg.page_tokens)
        room = [d for d in self.decode if d.allocator.num_available() >= need
                and len(d.scheduler.running) + len(d.reserving) < d.pool.max_num_seqs]
        if not room:
            self.apply(Side.CONSUMER, self.consumers.refuse(offer, "decode pool full", now), now)
            return
        chosen = max(room, key=lambda d: d.allocator.num_available())
        self.target[offer.request_id] = chosen
        chosen.reserving.add(offer.request_id)
        nbytes = int(kv_bytes_per_token(self.cfg.model, self.cfg.decode.kv_fmt) * spec.input_tokens)
        self.apply(Side.CONSUMER, self.consumers.reserve(offer, chosen.allocator.allocate(need), nbytes, now), now)

    def transfer(self, transfer_id: str, now: float) -> None:
        request_id = _request_of(transfer_id)
        cfg = self.cfg
        cost = handoff_time(cfg.model, cfg.wire_fmt, self.specs[request_id].input_tokens, cfg.link, cfg.page_tokens,
                            conversion_gbps=cfg.conversion_gbps)
        # One link, first come first served; the receiver pulls once the notice of the transfer
        # reached it (the control latency).
        begin = max(now + cfg.control_latency_s, self.link_free_at)
        self.link_free_at = begin + cost.seconds
        self.link_busy += cost.seconds
        self.times[request_id].handoff_start = now
        self.push(self.link_free_at + cfg.handoff_overhead_s, "transfer_done", transfer_id)

    def commit(self, request_id: str, blocks: list[int], now: float) -> None:
        spec = self.specs[request_id]
        seq = Sequence(request_id, [0] * (spec.input_tokens + 1), spec.input_tokens, spec.output_tokens)
        seq.num_computed_tokens = spec.input_tokens
        seq.block_table = blocks
        instance = self.target[request_id]
        instance.reserving.discard(request_id)
        instance.scheduler.add_running(seq)
        self.times[request_id].handoff_end = now
        self.kick(instance, now)


def summarize(times: Seq[RequestTimes], end: float, slo: SLO, prefill_busy: Seq[float], decode_busy: Seq[float],
              link_busy: float, peak_transient_bytes: int, retries: int, expired: int, preemptions: int) -> SimResult:
    """A run's result from each request's times and each resource's busy seconds (both simulators).
    Goodput and throughput are over the span to the last finish (the run's end when none finished)."""
    done = [t for t in times if t.finished is not None]
    duration = max((t.finished or 0.0) for t in done) if done else end
    span = max(duration, 1e-9)
    meets = [t for t in done if (t.ttft or 0.0) <= slo.ttft and (t.tpot or 0.0) <= slo.tpot]
    utilisation = {
        "prefill compute": sum(prefill_busy) / (span * len(prefill_busy)),
        "decode": sum(decode_busy) / (span * len(decode_busy)) if decode_busy else 0.0,
        "link": link_busy / span,
    }
    return SimResult(
        tuple(times), duration,
        Distribution.of([t.ttft for t in done if t.ttft is not None]),
        Distribution.of([t.tpot for t in done if t.tpot is not None]),
        Distribution.of([t.e2e for t in done if t.e2e is not None]),
        len(meets) / span, len(done) / span, utilisation["prefill compute"], utilisation["decode"],
        utilisation["link"], peak_transient_bytes, max(utilisation, key=utilisation.__getitem__),
        retries, expired, preemptions)


def simulate(config: SimConfig, requests: Seq[RequestSpec], slo: SLO = SLO(), lease: LeaseConfig | None = None,
             horizon_s: float = 3600.0) -> SimResult:
    """Run every request through the deployment; returns latencies, goodput, utilisation, peaks."""
    sim = _Simulation(config, requests, lease)
    end = sim.run_until(horizon_s)
    return summarize([sim.times[str(r.index)] for r in requests], end, slo, [i.busy_time for i in sim.prefill],
                     [i.busy_time for i in sim.decode], sim.link_busy, sim.ledger.snapshot().peak_total_bytes,
                     sim.retries, sim.expired, sim.preemptions)
