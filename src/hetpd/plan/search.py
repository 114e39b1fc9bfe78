"""Search the placements a fleet allows, simulate each, rank them and say what binds. Pure Python.

A candidate picks an accelerator type and count for the prefill pool and for the decode pool,
a weight precision per role, the decode side's KV format at rest and the KV format on the wire.
Candidates that do not fit in memory are rejected with the reason; the rest run through the
simulator (the runtime's own scheduler, allocator and leases) on the scenario's workload.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hetpd.bench.metrics import SLO
from hetpd.bench.workload import RequestSpec, build_requests
from hetpd.kv.encodings import format_for
from hetpd.kv.format import ModelFingerprint
from hetpd.kv.plan import plan_handoff
from hetpd.plan.cost import Efficiency, kv_bytes_per_token, load_efficiency, memory_fit
from hetpd.plan.scenario import Scenario
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult, simulate
from hetpd.plan.spec import Accelerator, Catalog, ModelShape

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


@dataclass(frozen=True)
class Evaluation:
    candidate: Candidate
    fits: bool
    reason: str  # why it was rejected, or the representation verdict of its handoff
    result: SimResult | None = None

    @property
    def accelerators(self) -> int:
        c = self.candidate
        return c.prefill_count * c.prefill_tp + c.decode_count * c.decode_tp

    @property
    def goodput(self) -> float:
        return 0.0 if self.result is None else self.result.goodput

    @property
    def goodput_per_accelerator(self) -> float:
        return self.goodput / self.accelerators

    def cost_per_hour(self, catalog: Catalog) -> float | None:
        """Summed price of the accelerators used, when every one of them has a price in the catalog."""
        return self._summed(catalog, lambda acc: acc.price_per_hour)

    def power_kw(self, catalog: Catalog) -> float | None:
        watts = self._summed(catalog, lambda acc: acc.tdp_w)
        return None if watts is None else watts / 1000

    def _summed(self, catalog: Catalog, figure: Callable[[Accelerator], float | None]) -> float | None:
        """A per-accelerator figure summed over every accelerator used (None if one lacks it)."""
        c = self.candidate
        prefill, decode = figure(catalog.accelerator(c.prefill)), figure(catalog.accelerator(c.decode))
        if prefill is None or decode is None:
            return None
        return c.prefill_count * c.prefill_tp * prefill + c.decode_count * c.decode_tp * decode


@dataclass(frozen=True)
class PlanResult:
    ranked: tuple[Evaluation, ...]  # best goodput per accelerator first
    rejected: tuple[Evaluation, ...]
    pareto: tuple[Evaluation, ...]  # no other candidate has more goodput with as few accelerators


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


def evaluate(candidate: Candidate, scenario: Scenario, catalog: Catalog, model: ModelShape,
             requests: list[RequestSpec], efficiency: Efficiency = Efficiency()) -> Evaluation:
    built = build_config(candidate, scenario, catalog, model, requests, efficiency)
    if isinstance(built, Evaluation):
        return built
    config, verdict = built
    return Evaluation(candidate, True, verdict, simulate(config, requests, scenario_slo(scenario)))


def scenario_slo(scenario: Scenario) -> SLO:
    return SLO(ttft=scenario.slo.ttft_ms / 1000, tpot=scenario.slo.tpot_ms / 1000)


def build_config(candidate: Candidate, scenario: Scenario, catalog: Catalog, model: ModelShape,
                 requests: list[RequestSpec], efficiency: Efficiency = Efficiency()) -> tuple[SimConfig, str] | Evaluation:
    """The simulator's view of a candidate, or its rejection (capacity) with the reason."""
    c = candidate
    p_acc = tensor_parallel(catalog.accelerator(c.prefill), c.prefill_tp)
    d_acc = tensor_parallel(catalog.accelerator(c.decode), c.decode_tp)
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
    config = SimConfig(
        model,
        PoolSpec(p_acc, c.prefill_count, _compute(p_acc, c.prefill_weights), c.prefill_weights, "bf16",
                 kv_pool_tokens=PREFILL_BATCH_TOKENS * 4),
        PoolSpec(d_acc, c.decode_count, _compute(d_acc, c.decode_weights), c.decode_weights, c.kv_format,
                 kv_pool_tokens=kv_tokens),
        catalog.link(scenario.link), wire_fmt=c.wire_format,
        # A fused conversion kernel reads and writes the KV once at about a quarter of peak bandwidth.
        conversion_gbps=None if handoff.site == "none" else d_acc.memory_tbps * 1e3 / 4,
        efficiency=efficiency,
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


def plan(scenario: Scenario, catalog: Catalog, progress: Callable[[int, int], None] | None = None,
         rank_by: str = "accelerator") -> PlanResult:
    """``rank_by``: goodput per "accelerator", per "cost" (price per hour, from the catalog) or per
    "power" (kW of TDP). Placements without the figure rank last."""
    if rank_by not in ("accelerator", "cost", "power"):
        raise ValueError(f"rank_by {rank_by!r}: choose accelerator, cost or power")
    model = catalog.model(scenario.model)
    requests = build_requests(scenario.workload)
    efficiency = load_efficiency(scenario.calibration) if scenario.calibration else Efficiency()
    everything = list(candidates(scenario))
    done: list[Evaluation] = []
    for i, candidate in enumerate(everything):
        done.append(evaluate(candidate, scenario, catalog, model, requests, efficiency))
        if progress is not None:
            progress(i + 1, len(everything))
    def score(e: Evaluation) -> float:
        if rank_by == "accelerator":
            return e.goodput_per_accelerator
        denominator = e.cost_per_hour(catalog) if rank_by == "cost" else e.power_kw(catalog)
        return -1.0 if not denominator else e.goodput / denominator

    ok = sorted((e for e in done if e.fits), key=lambda e: (-score(e), e.accelerators))
    pareto = [e for e in ok if not any(o.goodput > e.goodput and o.accelerators <= e.accelerators for o in ok)]
    pareto = sorted({(e.accelerators, round(e.goodput, 6)): e for e in pareto}.values(), key=lambda e: e.accelerators)
    return PlanResult(tuple(ok), tuple(e for e in done if not e.fits), tuple(pareto))
