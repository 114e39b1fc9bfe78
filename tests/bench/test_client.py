"""The load generator's measurements against an independent server with known, injected delays."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hetpd.bench.metrics import SLO
from hetpd.bench.runner import run
from hetpd.bench.workload import RequestSpec

TTFT_MS, ITL_MS, SLOW_TTFT_MS = 120.0, 25.0, 400.0


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    """Every 3rd request is slow to start (SLOW_TTFT): the SLO test counts on it."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_server.py"), str(TTFT_MS),
                                str(ITL_MS), "3", str(SLOW_TTFT_MS)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = process.stdout.readline().split()[1]
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


def specs(n: int, output_tokens: int, spacing: float | None) -> list[RequestSpec]:
    return [RequestSpec(i, None if spacing is None else i * spacing, 8, output_tokens) for i in range(n)]


@pytest.mark.timeout(120)
def test_ttft_tpot_and_goodput_match_the_injected_delays(fake_server: str) -> None:
    work = specs(12, 11, None)
    slo = SLO(ttft=(TTFT_MS + 60) / 1000, tpot=(ITL_MS + 10) / 1000)
    result = asyncio.run(run(work, [[1] * 8] * len(work), fake_server, "fake", concurrency=3, slo=slo,
                             progress=None))
    s = result.summary
    assert s.succeeded == 12 and not s.errors
    fast = sorted(r.ttft for r in result.results if r.ttft is not None and r.ttft < SLOW_TTFT_MS / 2000)
    slow = [r.ttft for r in result.results if r.ttft is not None and r.ttft >= SLOW_TTFT_MS / 2000]
    assert len(fast) == 8 and len(slow) == 4  # the server's own pattern, seen by the client
    assert fast[len(fast) // 2] == pytest.approx(TTFT_MS / 1000, rel=0.05)
    assert sorted(slow)[1] == pytest.approx(SLOW_TTFT_MS / 1000, rel=0.05)
    assert s.tpot.p50 == pytest.approx(ITL_MS / 1000, rel=0.05)
    assert s.itl.p50 == pytest.approx(ITL_MS / 1000, rel=0.05)
    assert all(r.output_tokens == 11 for r in result.results)
    # Goodput counts exactly the fast two thirds: the slow starters miss the TTFT SLO.
    assert s.slo_attainment == pytest.approx(8 / 12)
    assert s.goodput == pytest.approx(8 / s.duration_s, rel=1e-6)
    assert s.send_lag.p99 < 0.05 and not result.warnings


@pytest.mark.timeout(120)
def test_timed_arrivals_keep_their_schedule_and_errors_are_counted(fake_server: str) -> None:
    work = specs(10, 4, 0.05)
    work[3] = RequestSpec(3, work[3].at, 8, 999)  # the fake server answers this one with HTTP 400
    result = asyncio.run(run(work, [[1] * 8] * len(work), fake_server, "fake", progress=None))
    sends = [r.sent - result.started_at for r in result.results]
    assert all(abs(sent - 0.05 * i) < 0.02 for i, sent in enumerate(sends))
    assert result.summary.errors == {"http_4xx": 1} and result.summary.succeeded == 9
    bad = result.results[3]
    assert not bad.ok and "HTTP 400" in (bad.error or "")


@pytest.mark.timeout(60)
def test_an_unreachable_server_is_an_error_per_request_not_a_crash() -> None:
    work = specs(3, 4, None)
    result = asyncio.run(run(work, [[1] * 8] * 3, "http://127.0.0.1:9", "fake", concurrency=1, progress=None))
    assert result.summary.errors == {"connection": 3}


def test_a_late_client_warns_that_it_may_be_the_bottleneck() -> None:
    from hetpd.bench.client import RequestResult
    from hetpd.bench.metrics import Distribution, summarize
    from hetpd.bench.runner import overhead_warnings

    late = [RequestResult(i, True, scheduled=float(i), sent=i + 0.05, end=i + 1.0, input_tokens=8, output_tokens=2,
                          first_token=i + 0.2, token_times=(i + 0.2, i + 0.3)) for i in range(20)]
    warnings = overhead_warnings(summarize(late, 20.0), Distribution.of([0.001] * 10), timed=True)
    assert len(warnings) == 1 and "50.0 ms late" in warnings[0]
    on_time = [RequestResult(i, True, float(i), i + 0.001, i + 1.0, 8, 2, i + 0.2, (i + 0.2, i + 0.3)) for i in range(20)]
    assert overhead_warnings(summarize(on_time, 20.0), Distribution.of([0.05] * 10), timed=True)[0].startswith(
        "the client's event loop stalled")
    assert not overhead_warnings(summarize(on_time, 20.0), Distribution.of([0.001] * 10), timed=True)
