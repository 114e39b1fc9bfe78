"""Transport profile: the fit recovers known link figures; a real quick measurement against a
peer process yields catalog links and leaves no process or shared-memory segment behind."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hetpd.plan import transport_profile as tp
from hetpd.plan.cost import handoff_time
from hetpd.plan.spec import Link, ModelShape, load_catalog
from hetpd.plan.transport_profile import LinkFit, LinkMeasurement, Sample, fit_link, measure_links
from hetpd.transfer.shm import list_segments

KIB, MIB = 1 << 10, 1 << 20


def synthetic(latency_us: float, gbps: float, per_span_us: float, repeats: int = 3) -> list[Sample]:
    """Exact samples of ``latency + bytes / bandwidth + spans * per_span`` on a profile-like grid,
    each variant repeated, with one wild outlier per variant (the median must ignore it)."""
    samples = []
    for nbytes in (64 * KIB, 1 * MIB, 8 * MIB, 32 * MIB):
        for spans in sorted({1, nbytes // (16 * KIB), nbytes // (64 * KIB)}):
            seconds = latency_us * 1e-6 + nbytes / (gbps * 1e9) + spans * per_span_us * 1e-6
            samples += [Sample(nbytes, spans, seconds)] * repeats + [Sample(nbytes, spans, 50 * seconds)]
    return samples


# ---------------------------------------------------------------------------- the fit
@pytest.mark.parametrize(("latency_us", "gbps", "per_span_us"), [(150.0, 3.5, 12.0), (2.0, 40.0, 0.5),
                                                                 (800.0, 0.9, 30.0)])
def test_fit_recovers_known_bandwidth_latency_and_per_span_overhead(latency_us: float, gbps: float,
                                                                      per_span_us: float) -> None:
    fit = fit_link(synthetic(latency_us, gbps, per_span_us))
    assert fit.bandwidth_bytes_per_s == pytest.approx(gbps * 1e9, rel=1e-6)
    assert fit.latency_us == pytest.approx(latency_us, rel=1e-6)
    assert fit.per_span_overhead_us == pytest.approx(per_span_us, rel=1e-6)
    assert fit.max_relative_residual < 1e-6 and fit.notes == ()
    assert fit.variants == 11  # 64 KiB in 64 KiB pages is the one-span variant


def test_fit_with_noise_stays_close() -> None:
    import random

    rng = random.Random(7)
    noisy = [Sample(s.nbytes, s.spans, s.seconds * rng.uniform(0.95, 1.05)) for s in synthetic(200.0, 2.0, 15.0, 7)]
    fit = fit_link(noisy)
    assert fit.bandwidth_bytes_per_s == pytest.approx(2e9, rel=0.1)
    assert fit.latency_us == pytest.approx(200.0, rel=0.25)
    assert fit.per_span_overhead_us == pytest.approx(15.0, rel=0.1)


def test_a_negative_fitted_overhead_is_clamped_to_zero_and_said_so() -> None:
    # Many spans slightly *faster* than one span of the same bytes: noise, not a real gain.
    samples = synthetic(100.0, 5.0, 0.0)
    samples = [Sample(s.nbytes, s.spans, s.seconds - (0.1e-6 * s.spans if s.spans > 1 else 0.0)) for s in samples]
    fit = fit_link(samples)
    assert fit.raw_per_span_overhead_us < 0
    assert fit.per_span_overhead_us == 0.0
    assert len(fit.notes) == 1 and "clamped to 0" in fit.notes[0] and "per-span" in fit.notes[0]


@pytest.mark.parametrize(("samples", "problem"), [
    ([], "no samples"),
    ([Sample(MIB, 1, 1e-3), Sample(MIB, 64, 2e-3)], "one transfer size"),
    ([Sample(MIB, 1, 1e-3), Sample(8 * MIB, 1, 4e-3), Sample(32 * MIB, 1, 9e-3)], "two different span counts"),
    ([Sample(MIB, 1, 1e-3), Sample(MIB, 64, 0.0), Sample(8 * MIB, 1, 4e-3)], r"samples\[1\].*seconds"),
    ([Sample(MIB, 1, 1e-3), Sample(MIB, 64, float("nan")), Sample(8 * MIB, 1, 4e-3)], r"samples\[1\]"),
    ([Sample(0, 1, 1e-3), Sample(MIB, 64, 2e-3), Sample(8 * MIB, 1, 4e-3)], r"samples\[0\].*nbytes"),
    ([Sample(MIB, 1, 5e-3), Sample(MIB, 64, 6e-3), Sample(8 * MIB, 1, 1e-3)], "does not grow with bytes"),
    ([(MIB, 1, 1e-3)], r"samples\[0\] must be a Sample"),
])
def test_fit_rejects_input_that_cannot_determine_the_link(samples: list[Sample], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        fit_link(samples)


# ---------------------------------------------------------------------------- catalog entries
def fake_measurement(backend: str, fit: LinkFit) -> LinkMeasurement:
    return LinkMeasurement(backend, fit, (), "somehost", "2031-02-03", 1.0)


def load_links(tmp_path: Path, entries: list[dict[str, object]]) -> dict[str, Link]:
    path = tmp_path / "measured.yaml"
    path.write_text(yaml.safe_dump({"links": entries}))
    return load_catalog([path]).links


def test_entries_load_as_links_that_price_a_handoff_as_the_fit_does(tmp_path: Path) -> None:
    fit = fit_link(synthetic(150.0, 3.5, 12.0))
    links = load_links(tmp_path, [fake_measurement("shm", fit).as_catalog_entry(),
                                  fake_measurement("tcp", fit).as_catalog_entry()])
    shm, tcp = links["local_shm"], links["local_tcp"]
    assert (shm.family, tcp.family) == ("host", "tcp")
    assert shm.efficiency == 1.0 and shm.confidence == "high"
    assert shm.sources == ("measured by hetpd profile on somehost 2031-02-03",)
    assert shm.bandwidth == pytest.approx(3.5e9, rel=1e-3)
    assert shm.latency_us == pytest.approx(150.0) and shm.per_transfer_overhead_us == pytest.approx(12.0)
    # The planner's handoff time on the loaded link is the fitted line: pages are the spans.
    model = ModelShape("m", layers=16, hidden_size=1024, num_attention_heads=16, num_kv_heads=4, head_dim=64,
                       intermediate_size=4096, vocab_size=32000, params_total_b=0.5, params_active_b=0.5)
    got = handoff_time(model, "bf16", prompt_tokens=1024, link=shm, page_tokens=16)
    pages = 1024 // 16
    assert got.seconds == pytest.approx(150e-6 + got.wire_bytes / 3.5e9 + pages * 12e-6, rel=1e-3)


def test_a_clamped_entry_says_so_in_its_sources_and_still_loads(tmp_path: Path) -> None:
    fit = LinkFit(2e9, 100.0, 0.0, 100.0, -1.5, 0.01, 6, ("per-span overhead fitted -1.50 us ...; clamped to 0",))
    entry = fake_measurement("tcp", fit).as_catalog_entry()
    assert entry["per_transfer_overhead_us"] == 0.0
    link = load_links(tmp_path, [entry])["local_tcp"]
    assert link.per_transfer_overhead_us == 0.0 and any("clamped to 0" in s for s in link.sources)


# ---------------------------------------------------------------------------- a real measurement
def children() -> set[int]:
    """Live child processes of this one (Linux /proc)."""
    mine = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            mine.add(int(pid))
    return mine


@dataclass(frozen=True)
class QuickRun:
    results: list[LinkMeasurement]
    log: list[str]
    seconds: float
    leaked_segments: set[str]
    leaked_children: set[int]


@pytest.fixture(scope="module")
def quick_run() -> Iterator[QuickRun]:
    segments, kids = set(list_segments(os.getpid())), children()
    messages: list[str] = []
    start = time.monotonic()
    results = measure_links(quick=True, log=messages.append)
    seconds = time.monotonic() - start
    yield QuickRun(results, messages, seconds, set(list_segments(os.getpid())) - segments, children() - kids)


@pytest.mark.timeout(120)
def test_quick_measurement_gives_positive_figures_for_both_backends(quick_run: QuickRun) -> None:
    assert [m.backend for m in quick_run.results] == ["shm", "tcp"]
    variants = sum(1 + sum(p < n for p in tp.QUICK_PAGES) for n in tp.QUICK_SIZES)
    for m in quick_run.results:
        assert 1e7 < m.fit.bandwidth_bytes_per_s < 1e12, m.summary()  # 10 MB/s .. 1 TB/s
        assert m.largest_transfer_gbps > 0
        assert m.fit.latency_us >= 0 and m.fit.per_span_overhead_us >= 0
        assert len(m.samples) == variants * tp.QUICK_REPEATS and all(s.seconds > 0 for s in m.samples)
        assert {s.spans for s in m.samples if s.nbytes == max(tp.QUICK_SIZES)} == {
            1, *(max(tp.QUICK_SIZES) // p for p in tp.QUICK_PAGES)}
    assert quick_run.seconds < 15, f"quick transport profile took {quick_run.seconds:.1f} s"


@pytest.mark.timeout(120)
def test_quick_measurement_entries_load_through_the_catalog(quick_run: QuickRun, tmp_path: Path) -> None:
    links = load_links(tmp_path, [m.as_catalog_entry() for m in quick_run.results])
    for m in quick_run.results:
        link = links[f"local_{m.backend}"]
        assert isinstance(link, Link)
        assert link.bandwidth == pytest.approx(m.fit.bandwidth_bytes_per_s, rel=1e-2)
        assert link.latency_us == pytest.approx(m.fit.latency_us, abs=0.01)
        assert link.sources[0].startswith(f"measured by hetpd profile on {socket.gethostname()} ")


@pytest.mark.timeout(120)
def test_quick_measurement_logs_progress(quick_run: QuickRun) -> None:
    text = "\n".join(quick_run.log)
    for backend in ("shm", "tcp"):
        assert f"{backend}: round {tp.QUICK_REPEATS}/{tp.QUICK_REPEATS}" in text
        assert any(line.startswith(f"[profile] {backend}: ") and "GB/s" in line and "per span" in line
                   for line in quick_run.log)


@pytest.mark.timeout(120)
def test_quick_measurement_leaves_no_segment_or_process_behind(quick_run: QuickRun) -> None:
    assert not quick_run.leaked_segments, f"leaked /dev/shm segments: {sorted(quick_run.leaked_segments)}"
    assert not quick_run.leaked_children, f"peer processes left running: {sorted(quick_run.leaked_children)}"


@pytest.mark.timeout(120)
def test_a_failure_mid_measurement_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    segments, kids = set(list_segments(os.getpid())), children()

    def broken_fit(samples: object) -> LinkFit:
        assert list_segments(os.getpid()) == [], "the shm sender should be closed before fitting"
        raise ValueError("fit broke")

    monkeypatch.setattr(tp, "fit_link", broken_fit)
    with pytest.raises(ValueError, match="fit broke"):
        measure_links(quick=True, log=lambda message: None)
    assert set(list_segments(os.getpid())) == segments
    assert children() == kids
