"""Drive a workload against a server: timed arrivals or fixed concurrency, with progress and a
measure of the load generator's own overhead (so it never silently becomes the bottleneck)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from hetpd.bench.client import RequestResult, send_request
from hetpd.bench.metrics import SLO, Distribution, Summary, summarize
from hetpd.bench.workload import RequestSpec

LAG_WARN_S = 0.010  # a client later than this (p99) on its own schedule distorts the arrival process
TICK_S = 0.005


@dataclass(frozen=True)
class RunResult:
    label: str
    rate: float | None
    concurrency: int | None
    started_at: float
    duration_s: float
    results: tuple[RequestResult, ...]
    summary: Summary
    loop_lag: Distribution  # how late a 5 ms timer fires in the client's event loop
    warnings: tuple[str, ...]


def stderr_progress(line: str) -> None:
    print("\r" + line, end="", file=sys.stderr, flush=True)


async def run(specs: Sequence[RequestSpec], prompts: Sequence[list[int]], url: str, model: str, *,
              api_key: str | None = None, concurrency: int | None = None, rate: float | None = None,
              slo: SLO = SLO(), label: str = "", timeout: float = 600.0,
              progress: Callable[[str], None] | None = stderr_progress) -> RunResult:
    """Send every spec (``concurrency`` at a time, or each at its ``at``); never raises for server errors."""
    if len(prompts) != len(specs):
        raise ValueError(f"{len(specs)} requests but {len(prompts)} prompts")
    results: list[RequestResult] = []
    in_flight = 0
    lags: list[float] = []
    finished = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.time() + 0.05

        async def one(spec: RequestSpec, scheduled: float) -> None:
            nonlocal in_flight
            in_flight += 1
            result = await send_request(client, url, model, prompts[spec.index], spec.output_tokens, spec.index,
                                        scheduled, api_key, timeout)
            in_flight -= 1
            results.append(result)

        async def timed(spec: RequestSpec) -> None:
            at = start + (spec.at or 0.0)
            await asyncio.sleep(max(0.0, at - time.time()))
            await one(spec, at)

        async def slot(queue: asyncio.Queue[RequestSpec]) -> None:
            while not queue.empty():
                spec = queue.get_nowait()
                await one(spec, time.time())

        async def monitor() -> None:
            last_report = 0.0
            while not finished.is_set():
                before = time.perf_counter()
                await asyncio.sleep(TICK_S)
                lags.append(time.perf_counter() - before - TICK_S)
                if progress is not None and time.time() - last_report > 0.5:
                    last_report = time.time()
                    errors = sum(1 for r in results if not r.ok)
                    progress(f"[bench{' ' + label if label else ''}] {len(results)}/{len(specs)} done, "
                             f"{in_flight} in flight, {errors} errors")

        watcher = asyncio.create_task(monitor())
        await asyncio.sleep(max(0.0, start - time.time()))
        if concurrency is not None:
            queue: asyncio.Queue[RequestSpec] = asyncio.Queue()
            for spec in specs:
                queue.put_nowait(spec)
            await asyncio.gather(*(slot(queue) for _ in range(max(1, concurrency))))
        else:
            await asyncio.gather(*(timed(spec) for spec in specs))
        finished.set()
        await watcher
    duration = max(r.end for r in results) - start if results else 0.0
    if progress is not None:
        progress(f"[bench{' ' + label if label else ''}] {len(results)}/{len(specs)} done in {duration:.1f}s\n")
    ordered = tuple(sorted(results, key=lambda r: r.index))
    summary = summarize(ordered, duration, slo)
    loop_lag = Distribution.of([max(0.0, lag) for lag in lags])
    return RunResult(label, rate, concurrency, start, duration, ordered, summary, loop_lag,
                     tuple(overhead_warnings(summary, loop_lag, concurrency is None)))


def overhead_warnings(summary: Summary, loop_lag: Distribution, timed: bool) -> list[str]:
    """Say so when the load generator, not the server, may be what the numbers measure."""
    warnings = []
    if timed and summary.send_lag.count and summary.send_lag.p99 > LAG_WARN_S:
        warnings.append(f"the client sent requests up to {1000 * summary.send_lag.p99:.1f} ms late (p99): the "
                        "arrival process was not the one asked for; lower the rate or run the client elsewhere")
    if loop_lag.count and loop_lag.p99 > 2 * LAG_WARN_S:
        warnings.append(f"the client's event loop stalled up to {1000 * loop_lag.p99:.1f} ms (p99): token "
                        "timings include client delay; lower the rate or run the client elsewhere")
    return warnings
