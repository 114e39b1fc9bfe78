"""An upper bound on a deployment's goodput as the planner counts it, from step prices alone.

The search uses it to skip placements that provably cannot reach the ranked table or the
Pareto frontier (branch and bound). The planner's goodput (:func:`charged_goodput`) is the
simulator's, ``|M| / S`` with ``M`` the finished requests meeting both SLOs and ``S`` the last
finish time, except that a run which leaves any request unfinished by its horizon ``H`` (stuck,
or too slow) is charged the whole horizon: ``|M| / H``. The bound is never below it, because:

**Step floors.** A pool's step coster prices a step's work ``w`` (prompt tokens, causal pairs,
decoding sequences, decode context). :func:`step_floors` gives affine functions
``f(w) = const + coefficients . w``, all terms non-negative, with ``seconds(w) >= f(w)`` for every
``w``: the roofline's compute (linear) and memory (the active weights plus the decoders' KV),
or a measured model's two branches. Such an ``f`` never decreases as work is added, so a step
lasts at least ``f`` of any part of its work.

**Per request** ``r`` (arrival ``a``, ``n`` prompt tokens, ``o`` output tokens), for every floor:

* a prefill attempt runs ``r``'s prompt in chunks, one per step, one step after another on one
  instance; the chunks add up to ``n`` tokens and ``n(n+1)/2`` causal pairs, so the attempt
  takes ``tau >= const + n * token + n(n+1)/2 * pair``.
* with one prefill instance, its scheduler serves requests in arrival order (a request gets
  prompt tokens in a step only after every earlier one has all of its own), so the work of
  requests ``j..r`` runs in ``[a_j, first_token_r]`` (Lindley): ``TTFT_r >= max_j (a_j + sum of
  their work) - a_r``, a step's work counted as its chunks' floors plus its constant shared by
  token (a step holds at most ``max_batch_tokens``).
* a decode step that samples ``r``'s token has ``r`` in it with context at least ``n + 1``, so it
  lasts ``delta >= const + seq + (n + 1) * context``.
* the handoff holds the one FIFO link for ``eta = handoff_time(n)`` and lands
  ``handoff_overhead_s`` later (a request with ``o <= 1`` finishes at prefill, hands nothing off).

So ``TTFT_r >= ttft_r`` (the larger of the two prefill bounds) and ``finished_r >= F_r = a +
ttft_r + [o >= 2] * (eta + overhead + (o - 1) * delta)``.

**TPOT** is ``(last token - first token) / (tokens - 1)`` over ``r``'s token events: its first
token, each retried prefill (after a refused or expired handoff; attempts run one after another,
each ``>= tau``) and its ``o - 1`` decode tokens (the first ``>= delta`` after the first token,
then ``>= delta`` apart). With ``k`` retries the span is at least ``max((o - 1) delta, k tau)``
over ``o - 1 + k`` gaps, which for any ``k`` is at least ``tau delta / (tau + delta)``.
``r`` can meet the SLO only if ``ttft_r <= SLO.ttft`` and (``o <= 1`` or that TPOT floor
``<= SLO.tpot``): the eligible set ``E``, and ``|M| <= |E|``.

**Span.** If every request finishes, ``S >= F_r`` for all of them, and every resource did all
of its work before ``S``: the prefill instances' (a step of at most ``max_batch_tokens`` tokens
shares its floor's constant by token), the link's (one transfer at a time) and the decode
instances' (a step of at most ``max_num_seqs`` sequences, or of at most the KV pool's tokens of
context, shares the constant by sequence or by context), each divided by how many run at once.
So the goodput is at most ``|E| / max(max F_r, work / capacity)``. If a request is left
unfinished, the goodput is ``|M| / H <= |E| / H``. The bound is the larger of the two, times
``1 + 1e-9``: the simulator adds its durations up in another order, and an exactly tight bound
(a lightly loaded last request) must survive the rounding. Deployments the argument does not
cover (colocated; an unknown step coster) get ``inf``. Pure Python plus numpy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec
from hetpd.core.step_work import StepWork
from hetpd.plan.cost import handoff_time
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult, pool_roofline
from hetpd.plan.step_model import MeasuredSteps

Array = npt.NDArray[np.float64]
ROUNDING_SLACK = 1e-9
MIN_HORIZON_S = 3600.0
PROBE_CONTEXT = 1 << 20


def horizon_for(requests: Sequence[RequestSpec]) -> float:
    """How long the planner simulates: an hour past the last arrival."""
    return MIN_HORIZON_S + max((r.at or 0.0 for r in requests), default=0.0)


def charged_goodput(result: SimResult, horizon_s: float) -> float:
    """The simulator's goodput, or, when it left a request unfinished within ``horizon_s``, the
    requests that met the SLO over the whole horizon (a deployment that never serves some
    requests is not credited with the short span of the ones it did)."""
    if all(t.finished is not None for t in result.requests):
        return result.goodput
    meets = round(result.goodput * max(result.duration_s, 1e-9))
    return meets / horizon_s


@dataclass(frozen=True)
class StepFloor:
    """``const + token * prefill_tokens + pair * prefill_pairs + seq * decode_seqs + context *
    decode_context``: seconds a step with that work lasts at least. Every term is non-negative."""

    const: float
    token: float
    pair: float
    seq: float
    context: float

    def __post_init__(self) -> None:
        if min(self.const, self.token, self.pair, self.seq, self.context) < 0:
            raise ValueError(f"a step floor's terms must be non-negative: {self}")


def step_floors(config: SimConfig, pool: PoolSpec, prompts: bool = False) -> tuple[StepFloor, ...] | None:
    """Affine floors under the step prices of ``pool``, or None for a coster they are unknown for.
    ``prompts``: every step of the pool computes at least one prompt token (a prefill pool).

    The roofline's compute is linear in the work (probed one unit at a time) and its memory is
    the weights a step reads (probed with the least work a step of the pool does: a MoE reads
    every expert for a prompt, only the active ones for a small decode batch) plus the decode
    context's KV; a measured model is ``overhead + max(weights, tokens) + pairs + context``."""
    if pool.steps is not None:
        m = pool.steps
        if not isinstance(m, MeasuredSteps):
            return None
        # A decode batch factor below 1 makes such steps cheaper than the line: scale the floors.
        k = min(1.0, *m.decode_batch_factor) if m.decode_batch_factor else 1.0
        return (StepFloor(k * (m.overhead + m.weights), 0.0, k * m.prefill_pair, 0.0, k * m.decode_context),
                StepFloor(k * m.overhead, k * m.prefill_token, k * m.prefill_pair, k * m.decode_seq,
                          k * m.decode_context))
    roofline = pool_roofline(config, pool)
    units = [StepWork(1, 0, 0, 0), StepWork(0, 1, 0, 0), StepWork(0, 0, 1, 0), StepWork(0, 0, 0, 1)]
    compute = [roofline.time(unit).compute_s for unit in units]
    least = StepWork(1, 1, 0, 0) if prompts else StepWork()
    weights = roofline.time(least).memory_s
    # The KV bytes per context token, from a large context (a one-token difference would lose digits).
    context = (roofline.time(StepWork(0, 0, 0, PROBE_CONTEXT)).memory_s - roofline.time(StepWork()).memory_s)
    return (StepFloor(0.0, *compute), StepFloor(weights, 0.0, 0.0, 0.0, max(0.0, context / PROBE_CONTEXT)))


class GoodputBound:
    """Upper bounds on the planner's goodput (:func:`charged_goodput`) of many deployments
    serving one request list under one SLO, simulated with one horizon.

    Invariant: ``bound(config) >= charged_goodput(simulate(config, requests, slo, horizon_s=h), h)``
    for every config (the module docstring has the proof). Memoises each wire's per-request
    handoff times (the only bound that costs a cost-model call per request), keyed on every
    figure they read.
    """

    def __init__(self, requests: Sequence[RequestSpec], slo: SLO, horizon_s: float) -> None:
        self.slo = slo
        self.horizon_s = horizon_s
        # The simulator handles arrivals in time order, equal times in list order.
        ordered = sorted(requests, key=lambda r: r.at or 0.0)
        self.arrival: Array = np.array([r.at or 0.0 for r in ordered], dtype=np.float64)
        self.prompt: Array = np.array([r.input_tokens for r in ordered], dtype=np.float64)
        self.pairs: Array = self.prompt * (self.prompt + 1) / 2
        self.decodes: Array = np.maximum(np.array([r.output_tokens for r in ordered], dtype=np.float64) - 1, 0)
        self.hands_off = self.decodes > 0
        self._prompts = [r.input_tokens for r in ordered]
        self._handoff: dict[Hashable, Array] = {}

    # ------------------------------------------------------------------ per-request lower bounds
    def prefill_seconds(self, floors: Sequence[StepFloor]) -> Array:
        """``tau``: the least time any prefill attempt of each request takes."""
        tau: Array = np.max([f.const + f.token * self.prompt + f.pair * self.pairs for f in floors], axis=0)
        return tau

    def prefill_work(self, floor: StepFloor, max_batch_tokens: int) -> Array:
        """Seconds of prefill-instance time each request's prompt takes under ``floor``, the
        step's constant shared by token."""
        work: Array = floor.token * self.prompt + floor.pair * self.pairs + floor.const * self.prompt / max_batch_tokens
        return work

    def queued_ttft(self, floors: Sequence[StepFloor], max_batch_tokens: int) -> Array:
        """TTFT of each request on a single prefill instance that serves in arrival order, at least
        (Lindley: ``max_j a_j + work of j..r``, less ``a_r``)."""
        best = np.zeros_like(self.arrival)
        for f in floors:
            done = np.cumsum(self.prefill_work(f, max_batch_tokens))  # work of requests 0..r
            before = np.concatenate([[0.0], done[:-1]])  # work of requests 0..r-1
            best = np.maximum(best, done + np.maximum.accumulate(self.arrival - before) - self.arrival)
        return best

    def decode_step_seconds(self, floors: Sequence[StepFloor]) -> Array:
        """``delta``: the least time a decode step sampling each request's token takes."""
        delta: Array = np.max([f.const + f.seq + f.context * (self.prompt + 1) for f in floors], axis=0)
        return delta

    def handoff_seconds(self, config: SimConfig) -> Array:
        """``eta``: how long each request's handoff holds the link (0 when it hands nothing off)."""
        link = config.link
        key = (config.model.id, config.wire_fmt, config.page_tokens, config.conversion_gbps, link.peak_unidir_gbps,
               link.efficiency, link.latency_us, link.per_transfer_overhead_us)
        if key not in self._handoff:
            self._handoff[key] = np.array(
                [handoff_time(config.model, config.wire_fmt, n, link, config.page_tokens,
                              conversion_gbps=config.conversion_gbps).seconds for n in self._prompts],
                dtype=np.float64) * self.hands_off
        return self._handoff[key]

    # ------------------------------------------------------------------ the bound
    def __call__(self, config: SimConfig) -> float:
        prefill, decode = step_floors(config, config.prefill, prompts=True), step_floors(config, config.decode)
        if config.colocated or prefill is None or decode is None:
            return math.inf
        p, d = config.prefill, config.decode
        tau, delta, eta = self.prefill_seconds(prefill), self.decode_step_seconds(decode), self.handoff_seconds(config)
        ttft = np.maximum(tau, self.queued_ttft(prefill, p.max_batch_tokens)) if p.count == 1 else tau
        tpot = tau * delta / np.maximum(tau + delta, 1e-300)
        eligible = int(np.count_nonzero((ttft <= self.slo.ttft) & (~self.hands_off | (tpot <= self.slo.tpot))))
        finish = self.arrival + ttft + self.hands_off * (eta + config.handoff_overhead_s) + self.decodes * delta
        span = max(float(np.max(finish, initial=0.0)), float(np.sum(eta)))
        for f in prefill:
            span = max(span, float(np.sum(self.prefill_work(f, p.max_batch_tokens))) / p.count)
        kv_tokens = max(1, d.kv_pool_tokens // config.page_tokens) * config.page_tokens
        for f in decode:
            own = float(np.sum(self.decodes * (f.seq + f.context * (self.prompt + 1))))
            by_seq = float(np.sum(self.decodes)) * f.const / d.max_num_seqs
            by_context = float(np.sum(self.decodes * (self.prompt + 1))) * f.const / kv_tokens
            span = max(span, (own + max(by_seq, by_context)) / d.count)
        all_finish = eligible / span if span > 0 else math.inf
        return max(all_finish, eligible / self.horizon_s) * (1.0 + ROUNDING_SLACK)
