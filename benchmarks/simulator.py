#!/usr/bin/env python
"""Simulator speed: simulated requests per wall second of the fast simulator (issue 6: at least
20,000 per second on one core), and the exact simulator beside it on the same requests.

The deployment is Llama-3.1-8B on 2 prefill + 4 decode H100s over RoCE 400G (the catalog's
roofline). The requests are the Azure conversation sample trace's lengths, cycled, with Poisson
arrivals at ``--load`` (75%) of the deployment's capacity, which the fast simulator measures first
(the finished-request rate when far more is offered than it can serve).

    .venv/bin/python benchmarks/simulator.py [--num-requests 100000] [--exact-requests 5000] [--repeats 3]

1. ``simulate_fast`` on all ``--num-requests`` requests, ``--repeats`` times: requests per wall second.
2. ``simulate`` and ``simulate_fast`` on the first ``--exact-requests`` of them, interleaved
   (exact, fast, exact, fast, ...): both speeds, and how far their median TTFT, median TPOT and
   goodput (and each request's finish time) differ.

Medians over the repeats; each run's time and the CPU pressure during it (Linux PSI: the share of
the run in which some task waited for a CPU, i.e. other jobs competed for the cores) go to stderr
as progress and, with ``--out``, to a JSON file. Both simulators are single-threaded pure Python
(``--pin`` also pins the process to one core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetpd.bench.metrics import SLO
from hetpd.bench.traces import sample_path
from hetpd.bench.workload import RequestSpec, build_requests, parse_workload
from hetpd.plan.fastsim import simulate_fast
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult, simulate
from hetpd.plan.spec import load_catalog
from machine_load import cpu_pressure_us

TARGET = 20_000.0  # simulated requests per wall second (issue 6)
SLO_USED = SLO(ttft=0.25, tpot=0.01)


def deployment() -> SimConfig:
    catalog = load_catalog()
    h100 = catalog.accelerator("nvidia_h100_sxm")
    return SimConfig(catalog.model("llama_3_1_8b"), PoolSpec(h100, 2), PoolSpec(h100, 4), catalog.link("roce_400g"))


def azure_requests(n: int, rate: float, seed: int = 0) -> list[RequestSpec]:
    return build_requests(parse_workload({
        "arrival": {"kind": "poisson", "rate": rate}, "num_requests": n, "seed": seed,
        "lengths": {"kind": "trace"}, "trace": {"path": str(sample_path("azure")), "format": "azure"}}))



def timed(run: Callable[[], SimResult]) -> tuple[SimResult, float, float]:
    """(result, wall seconds, CPU pressure share during the run; NaN without PSI)."""
    p0, t0 = cpu_pressure_us(), time.perf_counter()
    result = run()
    p1, t1 = cpu_pressure_us(), time.perf_counter()
    pressure = (p1 - p0) / 1e6 / (t1 - t0) if p0 is not None and p1 is not None else float("nan")
    return result, t1 - t0, pressure


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=100_000)
    parser.add_argument("--exact-requests", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=float, default=0.75, help="offered rate as a fraction of the capacity")
    parser.add_argument("--pin", action="store_true", help="pin the process to one core (the lowest allowed)")
    parser.add_argument("--out", type=Path, help="also write every run's numbers to this JSON file")
    args = parser.parse_args()
    if args.pin and hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        progress(f"pinned to core {core}")
    config = deployment()

    saturated = azure_requests(20_000, 1_000.0)  # far more than it can serve: throughput = capacity
    capacity = simulate_fast(config, saturated).throughput
    rate = args.load * capacity
    requests = azure_requests(args.num_requests, rate)
    progress(f"capacity {capacity:.1f} req/s (fast simulator at saturation); offering {rate:.1f} req/s "
             f"({100 * args.load:.0f}%): {args.num_requests} requests over {requests[-1].at or 0.0:.0f} s")

    fast_runs: list[dict[str, float]] = []
    fast_result: SimResult | None = None
    for repeat in range(args.repeats):
        fast_result, seconds, pressure = timed(lambda: simulate_fast(config, requests, SLO_USED))
        fast_runs.append({"seconds": seconds, "requests_per_s": args.num_requests / seconds, "cpu_pressure": pressure})
        progress(f"fast  {args.num_requests} requests, run {repeat + 1}/{args.repeats}: {seconds:.2f} s, "
                 f"{args.num_requests / seconds:,.0f} req/s [cpu pressure {100 * pressure:.0f}%]")
    assert fast_result is not None
    fast_speed = statistics.median(r["requests_per_s"] for r in fast_runs)

    few = requests[: args.exact_requests]
    pairs: list[dict[str, float]] = []
    exact_few: SimResult | None = None
    fast_few: SimResult | None = None
    for repeat in range(args.repeats):
        exact_few, exact_s, exact_p = timed(lambda: simulate(config, few, SLO_USED))
        fast_few, fast_s, fast_p = timed(lambda: simulate_fast(config, few, SLO_USED))
        pairs.append({"exact_seconds": exact_s, "exact_cpu_pressure": exact_p, "fast_seconds": fast_s,
                      "fast_cpu_pressure": fast_p})
        progress(f"exact {len(few)} requests, run {repeat + 1}/{args.repeats}: {exact_s:.2f} s, "
                 f"{len(few) / exact_s:,.0f} req/s [cpu pressure {100 * exact_p:.0f}%]; fast: {fast_s:.3f} s, "
                 f"{len(few) / fast_s:,.0f} req/s [{100 * fast_p:.0f}%]")
    assert exact_few is not None and fast_few is not None
    exact_speed = statistics.median(len(few) / p["exact_seconds"] for p in pairs)
    fast_few_speed = statistics.median(len(few) / p["fast_seconds"] for p in pairs)
    worst_finish = max((abs(e.finished - f.finished) for e, f in zip(exact_few.requests, fast_few.requests, strict=True)
                        if e.finished is not None and f.finished is not None), default=0.0)
    agreement = {
        "ttft_p50": (exact_few.ttft.p50, fast_few.ttft.p50), "tpot_p50": (exact_few.tpot.p50, fast_few.tpot.p50),
        "goodput": (exact_few.goodput, fast_few.goodput),
    }

    r = fast_result
    lines = [
        "Llama-3.1-8B, 2 prefill + 4 decode H100 (roofline), roce_400g; Azure conversation lengths, Poisson arrivals",
        f"capacity {capacity:.1f} req/s; offered {rate:.1f} req/s ({100 * args.load:.0f}%); "
        f"SLO TTFT <= {SLO_USED.ttft * 1000:.0f} ms, TPOT <= {SLO_USED.tpot * 1000:.0f} ms",
        f"fast, {args.num_requests} requests ({r.duration_s:.0f} simulated s): {fast_speed:,.0f} req/s per wall s "
        f"(median of {args.repeats}; target {TARGET:,.0f}: {'met' if fast_speed >= TARGET else 'NOT met'})",
        f"   TTFT p50 {r.ttft.p50 * 1000:.1f} ms p99 {r.ttft.p99 * 1000:.1f} ms, TPOT p50 {r.tpot.p50 * 1000:.2f} ms, "
        f"goodput {r.goodput:.1f} req/s, utilisation prefill {r.prefill_utilisation:.2f} decode "
        f"{r.decode_utilisation:.2f} link {r.link_utilisation:.2f}, retries {r.retries}, preemptions {r.preemptions}",
        f"first {len(few)} requests: exact {exact_speed:,.0f} req/s, fast {fast_few_speed:,.0f} req/s "
        f"({fast_few_speed / exact_speed:.0f}x; medians of {args.repeats}, interleaved)",
    ]
    for name, (exact_value, fast_value) in agreement.items():
        lines.append(f"   {name:9s} exact {exact_value:.6g}  fast {fast_value:.6g}  "
                     f"difference {100 * relative(fast_value, exact_value):.2g}%")
    lines.append(f"   largest difference of a request's finish time: {worst_finish:.1e} s")
    print("\n".join(lines))
    if args.out is not None:
        report: dict[str, Any] = {
            "capacity": capacity, "rate": rate, "num_requests": args.num_requests, "fast_runs": fast_runs,
            "fast_requests_per_s": fast_speed, "target": TARGET, "exact_requests": len(few), "pairs": pairs,
            "exact_requests_per_s": exact_speed, "fast_small_requests_per_s": fast_few_speed,
            "agreement": agreement, "worst_finish_difference_s": worst_finish, "summary": lines,
        }
        args.out.write_text(json.dumps(report, indent=1))
        progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()
