"""Search the placements a fleet allows, simulate the ones that can matter, rank them.

A candidate picks an accelerator type and count for the prefill pool and for the decode pool,
a weight precision per role, the decode side's KV format at rest and the KV format on the wire.
Candidates that do not fit in memory (or whose compute format the catalog has no figure for)
are rejected with the reason. The rest are searched by branch and bound: each gets an upper
bound on its goodput from the cost model (:mod:`hetpd.plan.bound`), they are visited best
bound first, and one is simulated (the runtime's own scheduler, allocator and leases on the
scenario's workload) unless its bound proves it can neither enter the first ``keep`` rows of
the ranking nor lie on the Pareto frontier. Those rows and the frontier are therefore exactly
what simulating every candidate gives (``prune=False`` does that; a test compares the two).

Goodput is the simulator's, except that a deployment which leaves a request unfinished an hour
past the last arrival is charged that whole horizon (:func:`hetpd.plan.bound.charged_goodput`):
a stuck deployment is not credited with the short span of the requests it did serve.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec, build_requests
from hetpd.kv.encodings import format_for
from hetpd.kv.format import ModelFingerprint
from hetpd.kv.plan import plan_handoff
from hetpd.plan.bound import GoodputBound, charged_goodput, horizon_for
from hetpd.plan.calibrated import Calibrated, PoolCalibration, load_calibrated
from hetpd.plan.cost import kv_bytes_per_token, memory_fit
from hetpd.plan.fastsim import simulate_fast
from hetpd.plan.scenario import Scenario
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult, simulate
from hetpd.plan.spec import Accelerator, Catalog, CatalogError, ModelShape

# The KV wire/at-rest formats as hetpd KV encodings (what the representation check reasons about).
KV_ENCODING = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8-tensor-f32", "int8": "int8-token-f32",
               "int4": "int4-g32-f16"}
PREFILL_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class Candidate:
    prefill: str
    prefill_count: int
    decode: str
    decode_count: int
    prefill_weights: str
    decode_weights: str
    kv_format: str
    wire_format: str
    prefill_tp: int = 1  # accelerators per prefill instance (tensor parallel)
    decode_tp: int = 1

    def describe(self) -> str:
        def pool(n: int, tp: int, acc: str) -> str:
            return f"{n}x{acc}" if tp == 1 else f"{n}x(TP{tp} {acc})"

        return (f"P {pool(self.prefill_count, self.prefill_tp, self.prefill)}[{self.prefill_weights}] -> "
                f"D {pool(self.decode_count, self.decode_tp, self.decode)}[{self.decode_weights}, kv {self.kv_format}] "
                f"wire {self.wire_format}")

    @property
    def accelerators(self) -> int:
        return self.prefill_count * self.prefill_tp + self.decode_count * self.decode_tp

    def cost_per_hour(self, catalog: Catalog) -> float | None:
        """Summed price of the accelerators used, when every one of them has a price in the catalog."""
        return self._summed(catalog, lambda acc: acc.price_per_hour)

    def power_kw(self, catalog: Catalog) -> float | None:
        watts = self._summed(catalog, lambda acc: acc.tdp_w)
        return None if watts is None else watts / 1000

    def _summed(self, catalog: Catalog, figure: Callable[[Accelerator], float | None]) -> float | None:
        """A per-accelerator figure summed over every accelerator used (None if one lacks it)."""
        prefill, decode = figure(catalog.accelerator(self.prefill)), figure(catalog.accelerator(self.decode))
        if prefill is None or decode is None:
            return None
        return self.prefill_count * self.prefill_tp * prefill + self.decode_count * self.decode_tp * decode


@dataclass(frozen=True)
class Evaluation:
    candidate: Candidate
    fits: bool
    reason: str  # why it was rejected, or the representation verdict of its handoff
    result: SimResult | None = None
    goodput: float = 0.0  # requests/s within the SLO, as the planner counts it (bound.charged_goodput)
    bound: float | None = None  # the upper bound on its goodput the search visited it by (>= goodput)

    @property
    def accelerators(self) -> int:
        return self.candidate.accelerators

    @property
    def unfinished(self) -> int:
        """Requests the simulation left unfinished (stuck, or past the horizon)."""
        return 0 if self.result is None else sum(t.finished is None for t in self.result.requests)

    @property
    def goodput_per_accelerator(self) -> float:
        return self.goodput / self.accelerators

    def cost_per_hour(self, catalog: Catalog) -> float | None:
        return self.candidate.cost_per_hour(catalog)

    def power_kw(self, catalog: Catalog) -> float | None:
        return self.candidate.power_kw(catalog)


@dataclass(frozen=True)
class Pruned:
    """A fitting candidate never simulated: its goodput bound proves it off the table and the frontier."""

    candidate: Candidate
    bound: float  # upper bound on its goodput

    @property
    def accelerators(self) -> int:
        return self.candidate.accelerators


@dataclass(frozen=True)
class SearchProgress:
    """Where a search stands: ``done`` of ``total`` candidates settled (rejected, simulated or pruned)."""

    done: int
    total: int
    rejected: int
    simulated: int
    pruned: int


@dataclass(frozen=True)
class PlanResult:
    """Invariants: ``ranked`` holds the simulated candidates, best first; its first ``keep`` rows and
    ``pareto`` equal what simulating every fitting candidate would give. Every fitting candidate is
    in ``ranked`` or in ``pruned``."""

    ranked: tuple[Evaluation, ...]  # best score first (goodput per accelerator, $ or kW); ties: fewer accelerators
    rejected: tuple[Evaluation, ...]
    pareto: tuple[Evaluation, ...]  # no other placement has as much goodput with as few accelerators, and more of one
    pruned: tuple[Pruned, ...] = ()
    keep: int = 0  # how many leading rows of ``ranked`` are exact

    @property
    def simulated(self) -> int:
        return len(self.ranked)


def candidates(scenario: Scenario) -> Iterator[Candidate]:
    counts = {entry.accelerator: entry.count for entry in scenario.fleet}
    space = scenario.search
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= space.max_instances_per_pool]
    tps = [t for t in (1, 2, 4, 8) if t <= space.max_tensor_parallel]
    for p_acc, d_acc in itertools.product(counts, repeat=2):
        for p_n, d_n, p_tp, d_tp in itertools.product(sizes, sizes, tps, tps):
            p_used, d_used = p_n * p_tp, d_n * d_tp
            if p_used > counts[p_acc] or d_used > counts[d_acc] or (p_acc == d_acc and p_used + d_used > counts[p_acc]):
                continue
            for p_w, d_w, kv, wire in itertools.product(space.weight_formats, space.weight_formats, space.kv_formats,
                                                        space.wire_formats):
                if kv in KV_ENCODING and wire in KV_ENCODING:
                    yield Candidate(p_acc, p_n, d_acc, d_n, p_w, d_w, kv, wire, p_tp, d_tp)


def run_simulator(config: SimConfig, requests: Sequence[RequestSpec], slo: SLO, horizon_s: float,
                  exact: bool = False) -> SimResult:
    """The simulator the planner runs: the fast mode (the same decisions on counters, the same
    result up to float rounding), or with ``exact`` the step-by-step one on the runtime's own objects."""
    if exact:
        return simulate(config, requests, slo, horizon_s=horizon_s)
    return simulate_fast(config, requests, slo, horizon_s=horizon_s)


def evaluate(candidate: Candidate, scenario: Scenario, catalog: Catalog, model: ModelShape,
             requests: list[RequestSpec], calibrated: Calibrated | None = None, exact: bool = False) -> Evaluation:
    built = build_config(candidate, scenario, catalog, model, requests, calibrated)
    if isinstance(built, Evaluation):
        return built
    config, verdict = built
    return simulated(candidate, config, verdict, requests, scenario_slo(scenario), exact=exact)


def simulated(candidate: Candidate, config: SimConfig, verdict: str, requests: list[RequestSpec], slo: SLO,
              bound: float | None = None, exact: bool = False) -> Evaluation:
    """Simulate a fitting candidate for an hour past the last arrival; goodput as the planner counts it."""
    horizon = horizon_for(requests)
    result = run_simulator(config, requests, slo, horizon, exact)
    return Evaluation(candidate, True, verdict, result, charged_goodput(result, horizon), bound)


def scenario_slo(scenario: Scenario) -> SLO:
    return SLO(ttft=scenario.slo.ttft_ms / 1000, tpot=scenario.slo.tpot_ms / 1000)


def build_config(candidate: Candidate, scenario: Scenario, catalog: Catalog, model: ModelShape,
                 requests: list[RequestSpec], calibrated: Calibrated | None = None) -> tuple[SimConfig, str] | Evaluation:
    """The simulator's view of a candidate, or its rejection (capacity) with the reason. A calibration
    prices the pools on the accelerator it profiled (:mod:`hetpd.plan.calibrated`); the catalog
    defaults price the rest."""
    c = candidate
    p_acc = tensor_parallel(catalog.accelerator(c.prefill), c.prefill_tp)
    d_acc = tensor_parallel(catalog.accelerator(c.decode), c.decode_tp)
    for role, acc, weights in (("prefill", p_acc, c.prefill_weights), ("decode", d_acc, c.decode_weights)):
        try:
            acc.flops(_compute(acc, weights))
        except CatalogError:
            return Evaluation(c, False, f"{role} compute: the catalog gives {c.prefill if role == 'prefill' else c.decode} "
                                        f"no throughput for {_compute(acc, weights)} ({weights} weights run in it)")
    longest = max(r.input_tokens + r.output_tokens for r in requests)
    p_fit = memory_fit(model, p_acc, c.prefill_weights, "bf16", PREFILL_BATCH_TOKENS)
    if not p_fit.fits:
        return Evaluation(c, False, "prefill capacity: " + p_fit.reason)
    d_weights = memory_fit(model, d_acc, c.decode_weights, c.kv_format, 0)
    kv_tokens = int(d_weights.free_bytes // kv_bytes_per_token(model, c.kv_format)) if d_weights.fits else 0
    if kv_tokens < longest:
        why = d_weights.reason or f"only {kv_tokens} KV tokens fit beside the weights; the longest request needs {longest}"
        return Evaluation(c, False, "decode capacity: " + why)
    fingerprint = ModelFingerprint(model.id, model.layers, model.num_kv_heads, model.head_dim, "-", "-", "-")
    handoff = plan_handoff(format_for(fingerprint, "bf16"), format_for(fingerprint, KV_ENCODING[c.kv_format]),
                           wire=format_for(fingerprint, KV_ENCODING[c.wire_format]))
    p_fmt, d_fmt = _compute(p_acc, c.prefill_weights), _compute(d_acc, c.decode_weights)

    def measured(acc: Accelerator, fmt: str) -> PoolCalibration:
        return calibrated.for_pool(acc.id, model, fmt) if calibrated is not None else PoolCalibration()

    p_cal, d_cal = measured(p_acc, p_fmt), measured(d_acc, d_fmt)
    config = SimConfig(
        model,
        PoolSpec(p_acc, c.prefill_count, p_fmt, c.prefill_weights, "bf16", kv_pool_tokens=PREFILL_BATCH_TOKENS * 4,
                 steps=p_cal.steps, efficiency=p_cal.efficiency),
        PoolSpec(d_acc, c.decode_count, d_fmt, c.decode_weights, c.kv_format, kv_pool_tokens=kv_tokens,
                 steps=d_cal.steps, efficiency=d_cal.efficiency),
        catalog.link(scenario.link), wire_fmt=c.wire_format,
        # A fused conversion kernel reads and writes the KV once at about a quarter of peak bandwidth.
        conversion_gbps=None if handoff.site == "none" else d_acc.memory_tbps * 1e3 / 4,
    )
    return config, handoff.verdict.kind.value


def tensor_parallel(acc: Accelerator, tp: int, scaling: float = 0.9) -> Accelerator:
    """``tp`` accelerators acting as one instance: memory adds up; compute and bandwidth add up
    less ``scaling`` per doubling (the all-reduces of every layer)."""
    if tp == 1:
        return acc
    factor = tp * scaling ** math.log2(tp)
    return dataclasses.replace(acc, id=f"{acc.id}x{tp}", peak_tflops={k: v * factor for k, v in acc.peak_tflops.items()},
                               memory_gb=acc.memory_gb * tp, memory_tbps=acc.memory_tbps * factor)


def _compute(acc: Accelerator, weights: str) -> str:
    """Matmuls run in the weight format where the hardware has units for it, else in bf16."""
    return weights if acc.runs_natively(weights) else "bf16"


RANKINGS = ("accelerator", "cost", "power")


def score(candidate: Candidate, goodput: float, catalog: Catalog, rank_by: str) -> float:
    """What the ranking sorts by: goodput per accelerator, per $/h or per kW; -1 without the figure.
    Monotone in ``goodput`` for a given candidate (a bound on goodput bounds the score)."""
    if rank_by == "accelerator":
        return goodput / candidate.accelerators
    denominator = candidate.cost_per_hour(catalog) if rank_by == "cost" else candidate.power_kw(catalog)
    return -1.0 if not denominator else goodput / denominator


def pareto_frontier(ranked: list[Evaluation]) -> list[Evaluation]:
    """The placements no other beats on both goodput and accelerators (as good in both, better in
    one), fewest accelerators first; of several at the same point, the best ranked."""
    position = {id(e): i for i, e in enumerate(ranked)}
    frontier: list[Evaluation] = []
    best = -math.inf
    for e in sorted(ranked, key=lambda e: (e.accelerators, -e.goodput, position[id(e)])):
        if e.goodput > best:
            frontier.append(e)
            best = e.goodput
    return frontier


def plan(scenario: Scenario, catalog: Catalog, progress: Callable[[SearchProgress], None] | None = None,
         rank_by: str = "accelerator", keep: int = 10, prune: bool = True, exact: bool = False) -> PlanResult:
    """Search the scenario's placements: the first ``keep`` rows of the ranking and the Pareto
    frontier are exact. ``rank_by``: goodput per "accelerator", per "cost" (price per hour, from
    the catalog) or per "power" (kW of TDP); placements without the figure rank last.
    ``prune=False`` simulates every fitting candidate (brute force). ``exact``: simulate step by
    step on the runtime's own objects instead of the fast mode (:func:`run_simulator`).

    A candidate is skipped only when (1) its score bound ranks after the ``keep``-th best simulated
    candidate (ties broken by accelerators, then enumeration order, so its true rank does too) and
    (2) a simulated candidate with at most as many accelerators has at least its goodput bound
    (strictly more, or with strictly fewer accelerators): it is then dominated, so off the frontier.
    Both tests only get easier as more candidates are simulated, so a skip never needs undoing."""
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by {rank_by!r}: choose accelerator, cost or power")
    if keep < 1:
        raise ValueError(f"keep {keep}: the search must keep at least the best placement")
    model = catalog.model(scenario.model)
    requests = build_requests(scenario.workload)
    slo = scenario_slo(scenario)
    calibrated = load_calibrated(scenario.calibration) if scenario.calibration else None
    everything = list(candidates(scenario))
    rejected: list[Evaluation] = []
    fitting: list[tuple[int, Candidate, SimConfig, str]] = []
    for index, candidate in enumerate(everything):
        built = build_config(candidate, scenario, catalog, model, requests, calibrated)
        if isinstance(built, Evaluation):
            rejected.append(built)
        else:
            fitting.append((index, candidate, *built))
    bound = GoodputBound(requests, slo, horizon_for(requests))
    bounds = [bound(config) if prune else math.inf for _, _, config, _ in fitting]

    def key(index: int, candidate: Candidate, goodput: float) -> tuple[float, int, int]:
        """Ranking order, smaller first; distinct for distinct candidates."""
        return -score(candidate, goodput, catalog, rank_by), candidate.accelerators, index

    order = sorted(range(len(fitting)), key=lambda i: key(fitting[i][0], fitting[i][1], bounds[i]))
    worst_kept: list[tuple[float, int, int]] = []  # heap of the best ``keep`` keys, negated: [0] is the keep-th
    best_at: dict[int, float] = {}  # accelerators -> most goodput simulated
    visited: list[tuple[tuple[float, int, int], Evaluation]] = []
    pruned: list[Pruned] = []
    for i in order:
        index, candidate, config, verdict = fitting[i]
        ceiling, used = bounds[i], candidate.accelerators
        off_table = len(worst_kept) == keep and key(index, candidate, ceiling) > _negated(worst_kept[0])
        off_frontier = any(g > ceiling or (g >= ceiling and a < used) for a, g in best_at.items() if a <= used)
        if off_table and off_frontier:
            pruned.append(Pruned(candidate, ceiling))
        else:
            evaluation = simulated(candidate, config, verdict, requests, slo, ceiling if prune else None, exact)
            k = key(index, candidate, evaluation.goodput)
            visited.append((k, evaluation))
            heapq.heappush(worst_kept, _negated(k))
            if len(worst_kept) > keep:
                heapq.heappop(worst_kept)
            best_at[used] = max(best_at.get(used, -math.inf), evaluation.goodput)
        if progress is not None:
            progress(SearchProgress(len(rejected) + len(visited) + len(pruned), len(everything), len(rejected),
                                    len(visited), len(pruned)))
    if progress is not None and not fitting:
        progress(SearchProgress(len(everything), len(everything), len(rejected), 0, 0))
    ranked = [e for _, e in sorted(visited, key=lambda pair: pair[0])]
    return PlanResult(tuple(ranked), tuple(rejected), tuple(pareto_frontier(ranked)), tuple(pruned), keep)


def _negated(key: tuple[float, int, int]) -> tuple[float, int, int]:
    """A ranking key turned around, so that a min-heap of them keeps its worst at the top."""
    return -key[0], -key[1], -key[2]
