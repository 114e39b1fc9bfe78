"""Fast mode of the deployment simulator: the inputs and the result of
:func:`hetpd.plan.simulator.simulate`, at tens of thousands of simulated requests per wall second.

:func:`simulate_fast` makes the decisions ``simulate`` makes (least-loaded prefill instance;
scheduling under the token budget, the sequence limit and free pages, chunked prefill,
preemption of the most recently admitted sequence and recompute; the decode instance with the
most free pages that fits the prompt and has a slot, else a refusal and a new prefill when a
decode sequence finishes; one first-come-first-served link) on counters instead of the runtime's
``Sequence``, ``BlockAllocator`` and lease objects, and it does not step every decode step:

* A sequence that decodes one token per step is kept *in lockstep*: only the step it joined at
  (``join``) and its context then (``ctx0``) are stored, so its context at step ``g`` is
  ``ctx0 + g - join``. The instance keeps the lockstep batch's size ``B``, total context ``S``
  (it grows by ``B`` per step), a heap of finish steps, and how many sequences sit at each
  residue modulo the page size (a sequence needs a new page on the step its context crosses a
  page boundary, so the residues say how many pages each step takes).
* While nothing but lockstep decodes runs, the instance jumps over a *segment* of steps to the
  next event (a sequence finishing, pages running short) in O(1): for a fixed batch the step time
  is linear in ``S`` for :class:`~hetpd.plan.step_model.MeasuredSteps` and the larger of two
  lines (compute, memory) for :class:`~hetpd.plan.step_model.RooflineSteps`, so the time of ``k``
  steps is a closed-form sum (:class:`DecodeCurve`), inverted with a quadratic when something
  happens mid-segment (a handoff lands, pages are reserved, a request arrives): the segment is
  cut at the end of the step in progress and planned again.
* Any other step (prompt chunks, recompute after preemption, admission from the queue, a page
  shortage) is scheduled on its own, exactly as the scheduler would: in O(prompt chunks) when
  the lockstep decodes all fit the budget and the pages (they advance as a block), else with
  every sequence made explicit (O(batch), only around preemptions).

The decisions are the same, so each request's first-token, last-token and finish times equal
``simulate``'s up to float rounding (``tests/plan/test_fastsim.py`` checks them to 1e-6 s, with
token counts, retries, preemptions and peak transient bytes, on named and random deployments).
What differs from ``simulate``:

* no lease objects and no lease ticks: ``expired`` is 0 (in ``simulate`` keepalives are delivered
  at once, so no lease expires either); transient bytes are booked with two counters;
* step times of a segment are summed in closed form, not one by one: times differ by float
  rounding (about 1e-12 s);
* events at exactly the same time may be handled in another order (``simulate`` handles a step
  boundary one heap round later); with continuous arrival times this does not happen, with equal
  arrival times the first batch of each prefill instance is formed the same way;
* a handoff that lands on a decode instance whose running set is full joins it anyway
  (``simulate`` raises, as ``Scheduler.add_running`` does);
* requests still running at ``horizon_s`` keep the token count and last-token time of their last
  explicit step (their lockstep tokens are counted when they finish).

Reproduced as ``simulate`` does them: a refused request's first-token time (and token count)
includes its first prefill; freeing a prefill instance's pages after a handoff does not wake that
instance if it sits idle with a queue.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec
from hetpd.core.step_work import StepWork
from hetpd.plan.cost import handoff_time, kv_bytes_per_token
from hetpd.plan.simulator import (
    PoolSpec,
    RequestTimes,
    SimConfig,
    SimResult,
    check_pools,
    pool_coster,
    summarize,
)
from hetpd.plan.step_model import LoopCost, MeasuredSteps, RooflineSteps, StepCoster

_PROBE = 1 << 20  # the context at which a coster is evaluated a second time to get its slope
_NEVER = 1 << 62  # a step index no segment reaches
# The time of k steps of one line is a quadratic in k; where its root for a given time lies further
# than this from a whole number of steps, float rounding (~1e-12 of a step) cannot change the step.
_CLEAR = 1e-6


@dataclass(frozen=True)
class DecodeCurve:
    """The time of one decode-only step of a fixed batch as a function of the batch's total
    context ``x``: ``low_a + low_b * x`` for ``x < split``, ``high_a + high_b * x`` from ``split``
    on (the upper envelope of two lines; ``split`` is infinite when one line binds everywhere)."""

    low_a: float
    low_b: float
    high_a: float
    high_b: float
    split: float

    def at(self, x: float) -> float:
        return self.low_a + self.low_b * x if x < self.split else self.high_a + self.high_b * x

    def split_step(self, context: int, batch: int) -> int:
        """The first step ``i >= 0`` of a segment starting at ``context`` (growing by ``batch`` a
        step) that uses the high line; :data:`_NEVER` when none does."""
        if not math.isfinite(self.split):
            return _NEVER
        if context >= self.split:
            return 0
        return min(_NEVER, math.ceil((self.split - context) / batch))


def _upper_envelope(a1: float, b1: float, a2: float, b2: float) -> DecodeCurve:
    """max(a1 + b1 x, a2 + b2 x) for x >= 0 as a :class:`DecodeCurve`."""
    if b1 == b2:
        a = max(a1, a2)
        return DecodeCurve(a, b1, a, b1, math.inf)
    (la, lb), (ha, hb) = sorted(((a1, b1), (a2, b2)), key=lambda line: line[1])  # low: the smaller slope
    split = (la - ha) / (hb - lb)
    return DecodeCurve(la, lb, ha, hb, max(split, 0.0))


def decode_curve(coster: StepCoster, batch: int) -> DecodeCurve:
    """The decode-only step time of ``batch`` sequences as a function of their total context.

    Both step models are linear in the context for a fixed batch (the roofline separately in its
    compute and its memory time), so two evaluations give the lines; a test checks the curve
    against ``coster.seconds`` itself."""
    if isinstance(coster, RooflineSteps):
        zero, probe = coster.time(StepWork(0, 0, batch, 0)), coster.time(StepWork(0, 0, batch, _PROBE))
        return _upper_envelope(zero.compute_s, (probe.compute_s - zero.compute_s) / _PROBE,
                               zero.memory_s, (probe.memory_s - zero.memory_s) / _PROBE)
    if isinstance(coster, MeasuredSteps):
        base, probe_s = coster.seconds(StepWork(0, 0, batch, 0)), coster.seconds(StepWork(0, 0, batch, _PROBE))
        return _upper_envelope(base, (probe_s - base) / _PROBE, base, (probe_s - base) / _PROBE)
    raise TypeError(f"fast mode prices decode steps of RooflineSteps or MeasuredSteps, not {type(coster).__name__}")


def _line_sum(a: float, b: float, context: int, batch: int, i0: int, i1: int) -> float:
    """Sum of ``a + b * (context + i * batch)`` over steps ``i0 <= i < i1``."""
    n = i1 - i0
    if n <= 0:
        return 0.0
    return n * a + b * (n * context + batch * (n * (i0 + i1 - 1) // 2))


class _Sequence:
    """One request on one instance. Explicit (``lockstep`` false): ``tokens`` known, ``computed``
    in the KV, ``held`` pages, as the runtime's ``Sequence`` keeps them. In lockstep (decoding one
    token a step): context ``ctx0 + g - join`` at step ``g``, done at step ``end``; ``key`` is
    ``(ctx0 - 1 - join) % page`` (it takes a page on the steps ``g`` with ``(key + g) % page == 0``)."""

    __slots__ = ("r", "input", "output", "tokens", "computed", "held", "lockstep", "join", "ctx0", "end", "key")

    def __init__(self, r: int, input_tokens: int, output_tokens: int, tokens: int, computed: int, held: int) -> None:
        self.r = r
        self.input = input_tokens
        self.output = output_tokens
        self.tokens = tokens
        self.computed = computed
        self.held = held
        self.lockstep = False
        self.join = self.ctx0 = self.end = self.key = 0


# Instance states: what the instance's pending event (if any) means.
_IDLE, _START, _SEGMENT, _EXEC = range(4)
# Event kinds on the simulation's heap.
_ARRIVE, _TRANSFER_DONE, _WAKE = range(3)


class _Engine:
    """One instance: the scheduler's queues and pages, lockstep decodes and the current plan.

    Invariants: ``g`` is the next step to schedule and ``t0`` when it is scheduled (the anchor);
    ``free`` is the free page count at the anchor; ``batch``/``context`` are the lockstep batch
    and its total context at step ``g``; ``running`` holds every running sequence in admission
    order (lockstep, explicit and ``pending`` joins not yet merged into the lockstep batch),
    ``prefilling`` the explicit ones in the same order. ``state`` says what the pending event
    does: ``_START`` schedules step ``g`` at ``t0``; ``_SEGMENT`` ends a lockstep stretch of
    ``seg_n`` steps at ``t0 + elapsed(seg_n)``; ``_EXEC`` ends the single step scheduled at
    ``t0``. Every event carries ``version``; a re-plan bumps it so the old event is ignored."""

    def __init__(self, sim: _Simulation, index: int, pool: PoolSpec, config: SimConfig, coster: StepCoster,
                 curves: dict[int, DecodeCurve], hands_off: bool) -> None:
        self.sim = sim
        self.index = index
        self.coster = coster
        self.curves = curves  # per batch size, shared by the instances of a pool
        self.hands_off = hands_off  # a prefill instance of a disaggregated deployment
        self.page = config.page_tokens
        self.num_blocks = max(1, pool.kv_pool_tokens // config.page_tokens)
        self.max_seqs = pool.max_num_seqs
        self.reserved_seqs = 0  # handoffs admitted here whose KV has not landed: their slots are taken
        self.budget = pool.max_batch_tokens
        self.free = self.num_blocks
        self.waiting: deque[_Sequence] = deque()
        self.running: dict[int, _Sequence] = {}
        self.prefilling: dict[int, _Sequence] = {}
        self.pending: list[_Sequence] = []
        self.batch = 0
        self.context = 0
        self.residues = [0] * self.page
        self.ends: list[tuple[int, int]] = []  # (finish step, request) of the lockstep sequences
        self.g = 0
        self.t0 = 0.0
        self.state = _IDLE
        self.version = 0
        self.busy = 0.0
        # the current segment
        self.seg_n = 0
        self.seg_curve = DecodeCurve(0.0, 0.0, 0.0, 0.0, math.inf)
        self.seg_split = _NEVER
        self.seg_before_split = 0.0
        self.seg_cum: list[int] | None = None
        # the step being executed (state _EXEC)
        self.chunks: list[tuple[_Sequence, int, int]] = []
        self.block_advanced = False  # the lockstep batch is part of the step as a block

    # ------------------------------------------------------------------ what others ask and tell
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def free_at(self, now: float) -> int:
        """Free pages at ``now``: a segment's steps take their pages when they start."""
        if self.state != _SEGMENT or now < self.t0:
            return self.free
        return self.free - self._crossings(self._steps_started(now))

    def enqueue(self, seq: _Sequence, now: float) -> None:
        """A new request (or a refused one again) waits for admission."""
        self.waiting.append(seq)
        self._touch(now)

    def join(self, seq: _Sequence, now: float) -> None:
        """A handed-off sequence (its pages reserved at admission) runs from the next step."""
        self.reserved_seqs -= 1
        self.running[seq.r] = seq
        self.pending.append(seq)
        self._touch(now)

    def reserve(self, pages: int, now: float) -> None:
        """Pages (and a sequence slot) taken for a handoff; a segment that would now run short is
        planned again."""
        self.free -= pages
        self.reserved_seqs += 1
        if self.state == _SEGMENT and self._crossings(self.seg_n) > self.free:
            self._cut(now)

    def release(self, pages: int, now: float) -> None:
        """Pages back from a handoff; an idle instance with queued prompts that now fit starts
        (as ``simulate`` kicks the scheduler)."""
        self.free += pages
        if self.waiting:
            self._touch(now)

    def wake(self, now: float, version: int) -> None:
        if version != self.version:
            return
        if self.state == _SEGMENT:
            self._advance(self.seg_n)
            self._finish_lockstep_due(now)
            self._plan(now)
        elif self.state == _EXEC:
            self._end_step(now)
        elif self.state == _START:
            self._plan(now)

    # ------------------------------------------------------------------ planning
    def _touch(self, now: float) -> None:
        """Something changed: an idle instance starts a step (as the runtime's kick does, one
        event later), a segment is cut; a pending or running single step sees it anyway."""
        if self.state == _IDLE:
            self.t0 = now
            self._schedule_wake(_START, now)
        elif self.state == _SEGMENT:
            self._cut(now)

    def _schedule_wake(self, state: int, at: float) -> None:
        self.state = state
        self.version += 1
        self.sim.push(at, _WAKE, self.index, self.version)

    def _cut(self, now: float) -> None:
        """End the segment at the end of the step in progress at ``now`` and plan again from there."""
        steps = self._steps_started(now)
        if steps >= self.seg_n:
            return  # the step in progress is the segment's last: its end event re-plans
        self._advance(steps)
        self.version += 1
        self._plan(now)

    def _plan(self, now: float) -> None:
        """Decide what happens from the anchor step ``g`` at ``t0 >= now``: nothing (idle), a
        lockstep segment, or a single scheduled step."""
        for seq in self.pending:
            self._to_lockstep(seq)
        self.pending.clear()
        batch, page = self.batch, self.page
        if not batch and not self.prefilling and not self.waiting:
            self.state = _IDLE
            return
        crossing = self.residues[-self.g % page] if batch else 0
        single = bool(self.prefilling) or batch > self.budget or crossing > self.free
        if not single and self.waiting and len(self.running) < self.max_seqs and batch < self.budget:
            head = self.waiting[0]
            single = -(-min(head.tokens, self.budget - batch) // page) <= self.free - crossing
        if single:
            if self.t0 <= now:
                self._start_step(now)
            else:
                self._schedule_wake(_START, self.t0)
            return
        if not batch:
            self.state = _IDLE  # only queued sequences that do not fit: the scheduler has nothing to run
            return
        self._plan_segment()

    def _plan_segment(self) -> None:
        """Lockstep from step ``g`` to the next finish or the step that runs out of pages."""
        batch, page, free = self.batch, self.page, self.free
        curve = self.curves.get(batch)
        if curve is None:
            curve = self.curves[batch] = decode_curve(self.coster, batch)
        self.seg_curve = curve
        self.seg_split = curve.split_step(self.context, batch)
        self.seg_before_split = (_line_sum(curve.low_a, curve.low_b, self.context, batch, 0, self.seg_split)
                                 if self.seg_split < _NEVER else 0.0)
        self.seg_cum = None
        steps = self.ends[0][0] - self.g
        if -(-steps // page) * batch > free:  # pages may run out first: find the step that fails
            cum = self._cum()
            cycles = free // batch  # whole page-cycles that fit: each takes one page per sequence
            for u in range(page):
                if cycles * batch + cum[u + 1] > free:
                    steps = min(steps, cycles * page + u)
                    break
        self.seg_n = steps
        self._schedule_wake(_SEGMENT, self.t0 + self._elapsed(steps))

    # ------------------------------------------------------------------ segment arithmetic
    def _elapsed(self, k: int) -> float:
        """Time of the segment's first ``k`` steps."""
        curve, context, batch, split = self.seg_curve, self.context, self.batch, self.seg_split
        if k <= split:
            return _line_sum(curve.low_a, curve.low_b, context, batch, 0, k)
        return self.seg_before_split + _line_sum(curve.high_a, curve.high_b, context, batch, split, k)

    def _steps_started(self, now: float) -> int:
        """How many of the segment's steps have started by ``now`` (0 before ``t0``; at most ``seg_n``)."""
        t0, n = self.t0, self.seg_n
        if now < t0:
            return 0
        curve, context, batch, split = self.seg_curve, self.context, self.batch, self.seg_split
        base, first = 0.0, 0
        if 0 < split < n and now - t0 >= self.seg_before_split:
            base, first = self.seg_before_split, split
        a, b = (curve.high_a, curve.high_b) if first >= split else (curve.low_a, curve.low_b)
        step0 = a + b * (context + first * batch)  # the regime's first step
        half = b * batch / 2
        room = now - t0 - base
        linear = step0 - half  # k steps from `first` take half * k^2 + linear * k
        if half > 0:
            root = math.sqrt(linear * linear + 4 * half * room)
            estimate = 2 * room / (linear + root) if linear > 0 else (root - linear) / (2 * half)
        else:
            estimate = room / step0 if step0 > 0 else float(n)
        whole = int(min(estimate, float(n)))
        k = max(0, min(first + whole, n - 1))  # k: the step in progress
        if _CLEAR < estimate - whole < 1 - _CLEAR and (k == first + whole or k == n - 1):
            return k + 1  # the root is far from a step boundary: rounding cannot move it across one
        while k + 1 < n and t0 + self._elapsed(k + 1) <= now:
            k += 1
        while k > 0 and t0 + self._elapsed(k) > now:
            k -= 1
        return k + 1

    def _cum(self) -> list[int]:
        """``cum[u]``: pages the lockstep batch takes in the segment's first ``u < page`` steps."""
        if self.seg_cum is None:
            residues, first = self.residues, -self.g % self.page  # step g + u takes residues[(-g - u) % page]
            self.seg_cum = [0, *itertools.accumulate(residues[first::-1] + residues[:first:-1])]
        return self.seg_cum

    def _crossings(self, steps: int) -> int:
        """Pages the lockstep batch takes in the next ``steps`` steps from the anchor."""
        if not steps or not self.batch:
            return 0
        return (steps // self.page) * self.batch + self._cum()[steps % self.page]

    def _advance(self, steps: int) -> None:
        """Move the anchor ``steps`` lockstep steps on (they ran, took their time and pages)."""
        if not steps:
            return
        elapsed = self._elapsed(steps)
        self.busy += elapsed
        self.free -= self._crossings(steps)
        self.context += steps * self.batch
        self.g += steps
        self.t0 += elapsed
        self.seg_cum = None

    # ------------------------------------------------------------------ the lockstep batch
    def _to_lockstep(self, seq: _Sequence) -> None:
        """``seq`` decodes one token a step from step ``g`` on (its next chunk is one token past the prompt)."""
        seq.lockstep = True
        seq.join = self.g
        seq.ctx0 = seq.tokens
        seq.end = self.g + seq.output - (seq.tokens - seq.input)
        seq.key = (seq.ctx0 - 1 - seq.join) % self.page
        self.batch += 1
        self.context += seq.ctx0
        self.residues[seq.key] += 1
        heapq.heappush(self.ends, (seq.end, seq.r))
        self.seg_cum = None

    def _finish_lockstep_due(self, now: float) -> None:
        """Lockstep sequences whose last token came with the step that ended at ``now``."""
        ends, g = self.ends, self.g
        while ends and ends[0][0] == g:
            seq = self.running.pop(heapq.heappop(ends)[1])
            context = seq.ctx0 + g - seq.join
            self.free += -(-(context - 1) // self.page)
            self.batch -= 1
            self.context -= context
            self.residues[seq.key] -= 1
            self.seg_cum = None
            times = self.sim.times[seq.r]
            times.num_tokens += g - seq.join
            times.last_token = now
            self.sim.finished(seq.r, now)

    def _make_explicit(self, now: float) -> None:
        """Every lockstep sequence becomes explicit (before a step that must look at each one)."""
        page, g = self.page, self.g
        for seq in self.running.values():
            if seq.lockstep:
                context = seq.ctx0 + g - seq.join
                seq.computed, seq.tokens, seq.held = context - 1, context, -(-(context - 1) // page)
                seq.lockstep = False
                if g > seq.join:
                    times = self.sim.times[seq.r]
                    times.num_tokens += g - seq.join
                    times.last_token = now
        self.batch = self.context = 0
        self.residues = [0] * page
        self.ends = []
        self.seg_cum = None

    # ------------------------------------------------------------------ single steps
    def _start_step(self, now: float) -> None:
        """Schedule step ``g`` at ``now`` as ``Scheduler.schedule`` does and start it."""
        chunks: list[tuple[_Sequence, int, int]] = []
        page, budget = self.page, self.budget
        crossing = self.residues[-self.g % page] if self.batch else 0
        demand, pages = self.batch, crossing
        for seq in self.prefilling.values():
            demand += seq.tokens - seq.computed
            pages += -(-seq.tokens // page) - seq.held
        preempted = 0
        if demand <= budget and pages <= self.free:
            # Everyone running gets its whole chunk and its pages: order does not matter.
            self.block_advanced = True
            self.free -= pages
            for seq in self.prefilling.values():
                chunks.append((seq, seq.computed, seq.tokens - seq.computed))
                seq.held = -(-seq.tokens // page)
            budget -= demand
        else:
            self.block_advanced = False
            self._make_explicit(now)
            budget, preempted = self._schedule_running(chunks)
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            num_new = min(seq.tokens, budget)
            need = -(-num_new // page)
            if need > self.free:
                break
            self.waiting.popleft()
            self.free -= need
            seq.computed, seq.held = 0, need
            self.running[seq.r] = self.prefilling[seq.r] = seq
            chunks.append((seq, 0, num_new))
            budget -= num_new
        if not chunks and not (self.block_advanced and self.batch):
            self.state = _IDLE  # an empty step: the runtime does not run it (nor count its preemptions)
            return
        self.sim.preemptions += preempted
        prefill_tokens = prefill_pairs = decode_seqs = decode_context = 0
        for seq, start, num_new in chunks:
            if num_new == 1 and start >= seq.input:
                decode_seqs += 1
                decode_context += start + 1
            else:
                prefill_tokens += num_new
                prefill_pairs += StepWork.chunk_pairs(start, num_new)
        if self.block_advanced:
            decode_seqs += self.batch
            decode_context += self.context
        seconds = self.coster.seconds(StepWork(prefill_tokens, prefill_pairs, decode_seqs, decode_context))
        self.busy += seconds
        self.chunks = chunks
        self.t0 = now
        self._schedule_wake(_EXEC, now + seconds)

    def _schedule_running(self, chunks: list[tuple[_Sequence, int, int]]) -> tuple[int, int]:
        """The running part of ``Scheduler.schedule`` over explicit sequences: each in admission
        order takes its chunk under the budget; when pages are short the most recently admitted is
        preempted (recomputed later). Returns the budget left and how many were preempted."""
        page, budget, preempted = self.page, self.budget, 0
        order = list(self.running.values())
        index = 0
        while index < len(order) and budget > 0:
            seq = order[index]
            num_new = min(seq.tokens - seq.computed, budget)
            while True:
                need = -(-(seq.computed + num_new) // page) - seq.held
                if need <= self.free:
                    if need > 0:
                        self.free -= need
                        seq.held += need
                    chunks.append((seq, seq.computed, num_new))
                    budget -= num_new
                    index += 1
                    break
                victim = order.pop()
                self.free += victim.held
                victim.held = victim.computed = 0
                del self.running[victim.r]
                self.waiting.appendleft(victim)
                preempted += 1
                if victim is seq:
                    break
        self.prefilling = dict(self.running)
        return budget, preempted

    def _end_step(self, now: float) -> None:
        """The single step ends: chunks advance, sampled tokens are delivered, finished sequences
        leave, decoding ones (re)join the lockstep batch; then plan what comes next."""
        self.g += 1
        self.t0 = now
        if self.block_advanced:
            self.context += self.batch
            self.seg_cum = None
        sim = self.sim
        for seq, start, num_new in self.chunks:
            seq.computed = start + num_new
            if seq.computed != seq.tokens:
                continue  # a prompt chunk that does not reach the end
            times = sim.times[seq.r]
            if not (self.hands_off and times.first_token is not None):  # a re-prefill's token was sent already
                times.token(now)
            if self.hands_off:
                del self.running[seq.r]
                del self.prefilling[seq.r]
                sim.prefilled(self, seq, now)
                continue
            seq.tokens += 1
            if seq.tokens - seq.input >= seq.output:
                self.free += seq.held
                del self.running[seq.r]
                del self.prefilling[seq.r]
                sim.finished(seq.r, now)
        self.chunks = []
        if self.block_advanced:
            self._finish_lockstep_due(now)
        if not self.hands_off:  # sequences whose next chunk is one decode token go (back) to lockstep
            for seq in [s for s in self.prefilling.values() if s.tokens - s.computed == 1 and s.computed >= s.input]:
                del self.prefilling[seq.r]
                self._to_lockstep(seq)
        self._plan(now)


class _Simulation:
    """One run's state: the instances, the link, the requests' times; :func:`simulate_fast` drives it."""

    def __init__(self, config: SimConfig, requests: Seq[RequestSpec]) -> None:
        check_pools(config)
        self.cfg = config
        self.requests = list(requests)
        self.times = [RequestTimes(r.at or 0.0) for r in self.requests]
        self.events: list[tuple[float, int, int, int, int]] = []
        self.counter = 0
        self.prefill = self._pool(config.prefill, hands_off=not config.colocated, first=0)
        self.decode = [] if config.colocated else self._pool(config.decode, hands_off=False, first=len(self.prefill))
        self.engines = self.prefill + self.decode
        self.refused: deque[int] = deque()
        self.retries = 0
        self.preemptions = 0
        self.link_free_at = 0.0
        self.link_busy = 0.0
        self.transient = 0
        self.peak_transient = 0
        self.producer: dict[int, _Engine] = {}
        self.target: dict[int, _Engine] = {}
        self.held: dict[int, tuple[int, int]] = {}  # request -> (producer pages, transient bytes) in flight
        self.handoff_s: dict[int, float] = {}  # prompt length -> link seconds
        self.producer_bytes = kv_bytes_per_token(config.model, config.prefill.kv_fmt)
        self.consumer_bytes = kv_bytes_per_token(config.model, config.decode.kv_fmt)

    def _pool(self, pool: PoolSpec, hands_off: bool, first: int) -> list[_Engine]:
        cfg = self.cfg
        coster = pool_coster(cfg, pool)
        curves: dict[int, DecodeCurve] = {}
        return [_Engine(self, first + i, pool, cfg, coster, curves, hands_off) for i in range(pool.count)]

    def push(self, at: float, kind: int, a: int, b: int = 0) -> None:
        self.counter += 1
        heapq.heappush(self.events, (at, self.counter, kind, a, b))

    # ------------------------------------------------------------------ the loop
    def run(self, horizon_s: float) -> float:
        """Handle every event up to ``horizon_s``; the given arrivals go first among equal times
        (``simulate`` queues them all before anything else). Returns the last event's time."""
        arrivals = sorted(range(len(self.requests)), key=lambda i: self.times[i].arrival)
        events, engines, times = self.events, self.engines, self.times
        now, next_arrival = 0.0, 0
        while True:
            if next_arrival < len(arrivals) and (not events or times[arrivals[next_arrival]].arrival <= events[0][0]):
                r = arrivals[next_arrival]
                if times[r].arrival > horizon_s:
                    break
                now = times[r].arrival
                next_arrival += 1
                self.arrive(r, now)
                continue
            if not events or events[0][0] > horizon_s:
                break
            now, _, kind, a, b = heapq.heappop(events)
            if kind == _WAKE:
                engines[a].wake(now, b)
            elif kind == _TRANSFER_DONE:
                self.transfer_done(a, now)
            else:
                self.arrive(a, now)
        return now

    # ------------------------------------------------------------------ requests
    def arrive(self, r: int, now: float) -> None:
        """To the prefill instance with the fewest queued and running sequences (the first of equals)."""
        spec = self.requests[r]
        chosen = min(self.prefill, key=_Engine.load)
        if spec.input_tokens <= 0:
            raise ValueError(f"sequence {spec.index} has no tokens")
        if -(-(spec.input_tokens + spec.output_tokens) // chosen.page) > chosen.num_blocks:
            raise ValueError(
                f"sequence {spec.index} needs {spec.input_tokens + spec.output_tokens} tokens of KV, more than the "
                f"whole pool ({chosen.num_blocks} blocks of {chosen.page}); lower max_tokens or raise num_kv_blocks")
        chosen.enqueue(_Sequence(r, spec.input_tokens, spec.output_tokens, spec.input_tokens, 0, 0), now)

    def prefilled(self, engine: _Engine, seq: _Sequence, now: float) -> None:
        """A prefill instance of a disaggregated deployment produced the first token."""
        if seq.output <= 1:
            engine.release(seq.held, now)
            self.times[seq.r].finished = now
            return
        self.offer(engine, seq, now)

    def offer(self, producer: _Engine, seq: _Sequence, now: float) -> None:
        """Hand the KV to the decode instance with the most free pages that fits it and has a slot;
        if none, refuse (the pages go back; prefilled again when a decode sequence finishes)."""
        need = seq.held
        best: _Engine | None = None
        best_free = -1
        for engine in self.decode:
            # free_at(now) <= engine.free: an instance that cannot beat the best so far is not asked
            if engine.free > best_free and engine.free >= need and \
                    len(engine.running) + engine.reserved_seqs < engine.max_seqs:
                free = engine.free_at(now)
                if free >= need and free > best_free:
                    best, best_free = engine, free
        if best is None:
            self.retries += 1
            self.refused.append(seq.r)
            producer.release(need, now)
            return
        best.reserve(need, now)
        held = int(self.producer_bytes * seq.input) + int(self.consumer_bytes * seq.input)
        self.transient += held
        self.peak_transient = max(self.peak_transient, self.transient)
        self.producer[seq.r], self.target[seq.r], self.held[seq.r] = producer, best, (need, held)
        seconds = self.handoff_s.get(seq.input)
        if seconds is None:
            cfg = self.cfg
            seconds = self.handoff_s[seq.input] = handoff_time(cfg.model, cfg.wire_fmt, seq.input, cfg.link,
                                                               cfg.page_tokens,
                                                               conversion_gbps=cfg.conversion_gbps).seconds
        self.link_free_at = max(now, self.link_free_at) + seconds  # one link, first come first served
        self.link_busy += seconds
        self.times[seq.r].handoff_start = now
        self.push(self.link_free_at + self.cfg.handoff_overhead_s, _TRANSFER_DONE, seq.r)

    def transfer_done(self, r: int, now: float) -> None:
        """The KV landed: the decode sequence joins its instance, the producer's pages go back."""
        pages, held = self.held.pop(r)
        self.transient -= held
        spec = self.requests[r]
        self.times[r].handoff_end = now
        self.target.pop(r).join(_Sequence(r, spec.input_tokens, spec.output_tokens, spec.input_tokens + 1,
                                          spec.input_tokens, pages), now)
        self.producer.pop(r).release(pages, now)

    def finished(self, r: int, now: float) -> None:
        """A request's last token: room freed, so every refused request gets another go."""
        self.times[r].finished = now
        while self.refused:
            self.push(now, _ARRIVE, self.refused.popleft())

    # ------------------------------------------------------------------ the result
    def result(self, end: float, slo: SLO) -> SimResult:
        """The same summary :func:`~hetpd.plan.simulator.simulate` computes."""
        return summarize(self.times, end, slo, [e.busy for e in self.prefill], [e.busy for e in self.decode],
                         self.link_busy, self.peak_transient, self.retries, 0, self.preemptions)


def simulate_fast(config: SimConfig, requests: Seq[RequestSpec], slo: SLO = SLO(),
                  horizon_s: float = 3600.0) -> SimResult:
    """:func:`~hetpd.plan.simulator.simulate`'s result for the same deployment and requests, from
    the fast simulation (module docstring: what it does and what it approximates)."""
    exact_only = [name for name, on in (("control_at_step_boundaries", config.control_at_step_boundaries),
                                        ("control_latency_s", config.control_latency_s > 0),
                                        ("prefill.interference", config.prefill.interference > 0),
                                        ("decode.interference", config.decode.interference > 0),
                                        ("prefill.loop", config.prefill.loop != LoopCost()),
                                        ("decode.loop", config.decode.loop != LoopCost())) if on]
    if exact_only:
        raise ValueError(f"{', '.join(exact_only)}: the fast simulator does not model this (lease messages arrive "
                         "at once; instances never slow each other; a worker loop costs nothing); simulate the config with "
                         "hetpd.plan.simulator.simulate (`hetpd plan --exact-simulator`)")
    sim = _Simulation(config, requests)
    end = sim.run(horizon_s)
    return sim.result(end, slo)
