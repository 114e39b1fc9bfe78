"""From per-request results to the numbers people compare: latency percentiles, throughput,
goodput under SLOs, errors by kind, and the load generator's own overhead. Pure Python."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hetpd.bench.client import RequestResult


@dataclass(frozen=True)
class SLO:
    """A request meets the SLO when its TTFT and its TPOT are at most these (seconds)."""

    ttft: float = math.inf
    tpot: float = math.inf


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(values)
        return cls(len(ordered), statistics.fmean(ordered), percentile(ordered, 50), percentile(ordered, 90),
                   percentile(ordered, 99))


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values (numpy's default)."""
    if len(ordered) == 1:
        return float(ordered[0])
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@dataclass(frozen=True)
class Summary:
    requests: int
    succeeded: int
    duration_s: float
    request_throughput: float  # finished requests per second
    output_throughput: float  # output tokens per second
    goodput: float  # requests per second meeting the SLO
    slo_attainment: float  # fraction of all requests meeting the SLO
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    send_lag: Distribution  # scheduled -> sent: the client's own overhead
    errors: dict[str, int] = field(default_factory=dict)
    slo: SLO = SLO()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["slo"] = {k: (None if math.isinf(v) else v) for k, v in out["slo"].items()}
        return out


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO = SLO()) -> Summary:
    ok = [r for r in results if r.ok]
    meets = [r for r in ok if (r.ttft or 0.0) <= slo.ttft and (r.tpot if r.tpot is not None else 0.0) <= slo.tpot]
    duration = max(duration_s, 1e-9)
    return Summary(
        requests=len(results), succeeded=len(ok), duration_s=duration_s,
        request_throughput=len(ok) / duration,
        output_throughput=sum(r.output_tokens for r in ok) / duration,
        goodput=len(meets) / duration,
        slo_attainment=len(meets) / len(results) if results else 0.0,
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Distribution.of([r.tpot for r in ok if r.tpot is not None]),
        itl=Distribution.of([gap for r in ok for gap in r.itls]),
        e2e=Distribution.of([r.e2e for r in ok]),
        send_lag=Distribution.of([r.send_lag for r in results]),
        errors=dict(Counter(r.error_kind for r in results if r.error_kind is not None)),
        slo=slo,
    )


def table(summary: Summary, label: str = "") -> str:
    """The end-of-run table: p50 / p90 / p99 / mean in milliseconds, and the rates."""
    lines = [f"{label}{summary.succeeded}/{summary.requests} ok in {summary.duration_s:.1f}s | "
             f"{summary.request_throughput:.2f} req/s, {summary.output_throughput:.1f} tok/s, "
             f"goodput {summary.goodput:.2f} req/s ({summary.slo_attainment:.0%} within SLO)",
             f"{'ms':<10}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}"]
    for name in ("ttft", "tpot", "itl", "e2e", "send_lag"):
        d: Distribution = getattr(summary, name)
        lines.append(f"{name:<10}" + "".join(f"{1000 * v:9.1f}" for v in (d.p50, d.p90, d.p99, d.mean)))
    if summary.errors:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.errors.items())))
    return "\n".join(lines)
