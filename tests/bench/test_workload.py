"""Workload configs and the requests they build: every combination, statistics, determinism."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetpd.bench.traces import read_trace, sample_path
from hetpd.bench.workload import (RequestSpec, WorkloadConfig, WorkloadError, build_requests, dump_workload,
                                  load_workload, parse_workload)

ARRIVALS: dict[str, dict[str, Any]] = {
    "concurrency": {"kind": "concurrency", "concurrency": 4},
    "poisson": {"kind": "poisson", "rate": 5.0},
    "gamma": {"kind": "gamma", "rate": 5.0, "cv": 3.0},
    "trace": {"kind": "trace"},
}
LENGTHS: dict[str, dict[str, Any]] = {
    "fixed": {"kind": "fixed", "input": 100, "output": 20},
    "uniform": {"kind": "uniform", "input": [10, 50], "output": [1, 8]},
    "lognormal": {"kind": "lognormal", "input_mean": 500, "input_sigma": 0.8, "output_mean": 100, "output_sigma": 0.5},
    "trace": {"kind": "trace"},
}


def config(arrival: str, lengths: str, **extra: Any) -> WorkloadConfig:
    raw: dict[str, Any] = {"arrival": ARRIVALS[arrival], "lengths": LENGTHS[lengths], "num_requests": 300, **extra}
    if "trace" in (arrival, lengths) and "trace" not in raw:
        raw["trace"] = {"path": str(sample_path("mooncake")), "format": "mooncake"}
    return parse_workload(raw)


def check_invariants(specs: list[RequestSpec], cfg: WorkloadConfig) -> None:
    assert [s.index for s in specs] == list(range(len(specs)))
    assert all(1 <= s.input_tokens <= cfg.max_input_tokens and 1 <= s.output_tokens <= cfg.max_output_tokens
               for s in specs)
    times = [s.at for s in specs]
    if cfg.arrival.kind == "concurrency":
        assert times == [None] * len(specs)
    else:
        assert times[0] == 0.0 and all(a is not None and b is not None and a <= b for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("arrival", ARRIVALS)
def test_every_combination_builds(arrival: str, lengths: str) -> None:
    cfg = config(arrival, lengths)
    specs = build_requests(cfg)
    assert len(specs) == 300
    check_invariants(specs, cfg)
    assert build_requests(cfg) == specs  # deterministic
    # Prefix ids travel with trace lengths only.
    assert any(s.prefix_ids for s in specs) == (lengths == "trace")


def test_trace_lengths_and_times_follow_the_trace() -> None:
    trace = read_trace(sample_path("mooncake"))
    specs = build_requests(config("trace", "trace", num_requests=None))
    assert len(specs) == 200
    for spec, record in zip(specs, trace.records):
        assert (spec.at, spec.input_tokens, spec.output_tokens, spec.prefix_ids) == \
            (record.at, min(record.input_tokens, 4096), min(record.output_tokens, 1024), record.prefix_ids)


def test_trace_replay_wraps_and_scales() -> None:
    specs = build_requests(config("trace", "trace", num_requests=400, time_scale=0.5))
    # The second pass starts one span plus one mean gap later: 72 s + 72/199 s, halved.
    assert specs[200].at == pytest.approx((72.0 + 72.0 / 199) * 0.5)
    rescaled = build_requests(config("trace", "trace", num_requests=400), rate=20.0)
    assert (len(rescaled) - 1) / (rescaled[-1].at or 0.0) == pytest.approx(20.0)


def test_untimed_trace_cannot_drive_arrivals() -> None:
    with pytest.raises(WorkloadError, match="arrival: a sharegpt_lengths trace has no timestamps"):
        config("trace", "trace", trace={"path": str(sample_path("sharegpt_lengths")), "format": "sharegpt_lengths"})
    cfg = config("trace", "fixed", trace={"path": str(sample_path("sharegpt_lengths"))})  # format sniffed at build
    with pytest.raises(WorkloadError, match="has no timestamps"):
        build_requests(cfg)


def test_sharegpt_lengths_need_count_tokens() -> None:
    cfg = config("poisson", "trace", trace={"path": str(sample_path("sharegpt"))})
    specs = build_requests(cfg, count_tokens=lambda s: len(s.split()))
    assert len(specs) == 300 and specs[0].input_tokens == 10 and specs[8].input_tokens == 10  # wrapped after 8
    with pytest.raises(ValueError, match="count_tokens"):
        build_requests(cfg)


def test_poisson_mean_rate() -> None:
    specs = build_requests(parse_workload({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["fixed"],
                                           "num_requests": 2000, "seed": 3}))
    assert (len(specs) - 1) / (specs[-1].at or 0.0) == pytest.approx(5.0, rel=0.10)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_rate_and_burstiness(cv: float) -> None:
    cfg = parse_workload({"arrival": {"kind": "gamma", "rate": 8.0, "cv": cv}, "lengths": LENGTHS["fixed"],
                          "num_requests": 5000, "seed": 1})
    times = [s.at or 0.0 for s in build_requests(cfg)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 1 / statistics.fmean(gaps) == pytest.approx(8.0, rel=0.10)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.15)


def test_rate_override_for_sweeps() -> None:
    cfg = config("poisson", "fixed", num_requests=2000)
    slow, fast = build_requests(cfg, rate=2.0), build_requests(cfg, rate=50.0)
    assert (slow[-1].at or 0.0) / (fast[-1].at or 1.0) == pytest.approx(25.0)  # same draws, rescaled
    assert [s.input_tokens for s in slow] == [s.input_tokens for s in fast]
    with pytest.raises(WorkloadError, match="rate: a fixed-concurrency workload"):
        build_requests(config("concurrency", "fixed"), rate=2.0)
    with pytest.raises(WorkloadError, match="rate: must be a positive"):
        build_requests(cfg, rate=0.0)


def test_seed_changes_draws_and_arrivals_do_not_change_lengths() -> None:
    a = build_requests(config("poisson", "uniform", seed=1))
    b = build_requests(config("poisson", "uniform", seed=2))
    assert [s.at for s in a] != [s.at for s in b] and [s.input_tokens for s in a] != [s.input_tokens for s in b]
    gamma = build_requests(config("gamma", "uniform", seed=1))
    assert [s.input_tokens for s in gamma] == [s.input_tokens for s in a]


@settings(max_examples=40, deadline=None)
@given(inp=st.integers(1, 10_000), out=st.integers(1, 10_000), max_in=st.integers(1, 5000), max_out=st.integers(1, 5000))
def test_clamps(inp: int, out: int, max_in: int, max_out: int) -> None:
    cfg = parse_workload({"arrival": ARRIVALS["concurrency"], "lengths": {"kind": "fixed", "input": inp, "output": out},
                          "num_requests": 3, "max_input_tokens": max_in, "max_output_tokens": max_out})
    spec = build_requests(cfg)[0]
    assert (spec.input_tokens, spec.output_tokens) == (min(inp, max_in), min(out, max_out))


def test_lognormal_lengths_have_the_mean_and_clamp_to_one() -> None:
    cfg = parse_workload({"arrival": ARRIVALS["poisson"], "num_requests": 4000, "max_input_tokens": 100_000,
                          "lengths": {"kind": "lognormal", "input_mean": 800, "input_sigma": 0.7,
                                      "output_mean": 1.0, "output_sigma": 2.0}})
    specs = build_requests(cfg)
    assert statistics.fmean(s.input_tokens for s in specs) == pytest.approx(800, rel=0.08)
    assert min(s.output_tokens for s in specs) == 1


def test_yaml_round_trip(tmp_path: Path) -> None:
    for cfg in (config("gamma", "lognormal", seed=7), config("trace", "trace", time_scale=0.25),
                config("concurrency", "uniform", max_input_tokens=64)):
        path = tmp_path / "w.yaml"
        path.write_text(dump_workload(cfg))
        assert load_workload(path) == cfg


def test_yaml_trace_path_is_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.jsonl").write_text(sample_path("mooncake").read_text())
    (tmp_path / "w.yaml").write_text("arrival: {kind: trace}\nlengths: {kind: fixed, input: 8, output: 8}\n"
                                     "trace: {path: traces/t.jsonl}\n")
    cfg = load_workload(tmp_path / "w.yaml")
    assert Path(cfg.trace.path if cfg.trace else "") == tmp_path / "traces" / "t.jsonl"
    assert len(build_requests(cfg)) == 200


@pytest.mark.parametrize(("raw", "message"), [
    ({"arrival": {"kind": "poisson", "rate": 0}, "lengths": LENGTHS["fixed"], "num_requests": 5}, "arrival.poisson.rate"),
    ({"arrival": {"kind": "gamma", "rate": 1, "cv": -1}, "lengths": LENGTHS["fixed"], "num_requests": 5},
     "arrival.gamma.cv"),
    ({"arrival": {"kind": "concurrency", "concurrency": 0}, "lengths": LENGTHS["fixed"], "num_requests": 5},
     "arrival.concurrency.concurrency"),
    ({"arrival": {"kind": "burst"}, "lengths": LENGTHS["fixed"], "num_requests": 5}, "arrival"),
    ({"arrival": ARRIVALS["poisson"], "lengths": {"kind": "uniform", "input": [9, 3], "output": [1, 2]},
      "num_requests": 5}, "lengths.uniform.input"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["fixed"], "num_requests": 5, "rate": 3}, "rate: Extra inputs"),
    ({"arrival": ARRIVALS["trace"], "lengths": LENGTHS["fixed"], "num_requests": 5}, "arrival: kind 'trace' needs a trace"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["trace"], "num_requests": 5}, "lengths: kind 'trace' needs"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["fixed"]}, "num_requests: required without a trace"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["fixed"], "num_requests": 5, "trace": {"path": "x.csv"}},
     "trace: given but unused"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["trace"], "trace": {"path": "x.csv", "format": "csv"}},
     "trace.format"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["fixed"], "num_requests": 5, "max_input_tokens": 0},
     "max_input_tokens"),
    ({"arrival": ARRIVALS["poisson"], "lengths": LENGTHS["fixed"], "num_requests": 5, "time_scale": 0}, "time_scale"),
])
def test_bad_configs_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(WorkloadError, match="is not a valid workload") as err:
        parse_workload(raw)
    assert message in str(err.value)


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("arrival: [unclosed\n")
    with pytest.raises(WorkloadError, match=r"w\.yaml: not valid YAML"):
        load_workload(path)
    path.write_text("arrival: {kind: poisson, rate: -2}\nlengths: {kind: fixed, input: 1, output: 1}\nnum_requests: 3\n")
    with pytest.raises(WorkloadError, match=r"w\.yaml is not a valid workload:\n  arrival\.poisson\.rate"):
        load_workload(path)
