"""hetpd bench against a real served 1P1D deployment: every arrival mode and trace format, checked
against the server's own per-request traces, and the command line end to end."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serve.served import Served, serve

from hetpd.bench.prompts import PromptBuilder
from hetpd.bench.runner import RunResult, run
from hetpd.bench.traces import sample_path
from hetpd.bench.workload import build_requests, parse_workload
from hetpd.models.tokenizer import Tokenizer

CLAMP = {"max_input_tokens": 96, "max_output_tokens": 8}


@pytest.fixture(scope="module")
def served(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    deploy = {"model": str(tiny_model_dir("llama")), "served_model_name": "tiny", "router": {"host": "127.0.0.1"},
              "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 256},
                        {"name": "decode", "role": "decode", "num_kv_blocks": 256, "dtype": "bfloat16",
                         "kv_cache_dtype": "int8"}]}
    with serve(deploy, tmp_path_factory.mktemp("bench")) as s:
        yield s


def bench(served: Served, model_dir: Path, workload: dict[str, Any]) -> RunResult:
    config = parse_workload({**CLAMP, "seed": 1, **workload})
    tokenizer = Tokenizer.from_dir(model_dir)
    specs = build_requests(config, count_tokens=lambda text: len(tokenizer.encode(text)))
    prompts = [PromptBuilder(tokenizer.vocab_size, frozenset({0, 1, 2})).build(s) for s in specs]
    concurrency = workload["arrival"].get("concurrency")
    result = asyncio.run(run(specs, prompts, served.url, "tiny", concurrency=concurrency, progress=None))
    assert result.summary.succeeded == len(specs), result.summary.errors
    return result


def against_server_traces(served: Served, result: RunResult) -> None:
    """The client's send and first-token times agree with the router's own trace of each request."""
    sent_gaps, first_gaps = [], []
    for r in result.results:
        steps = served.get(f"/v1/requests/{r.server_request_id}/trace")["steps"]
        assert r.first_token is not None
        sent_gaps.append(abs(steps["queued"] - r.sent))
        first_gaps.append(r.first_token - steps["first_token"])  # the token leaves the worker, then reaches us
        assert r.output_tokens == len(r.itls) + 1 or r.output_tokens >= 1
    assert statistics.median(sent_gaps) < 0.015 and max(sent_gaps) < 0.1, (sent_gaps, first_gaps)
    assert 0 <= statistics.median(first_gaps) < 0.015 and max(first_gaps) < 0.1, (sent_gaps, first_gaps)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arrival", [
    {"kind": "concurrency", "concurrency": 3},
    {"kind": "poisson", "rate": 8.0},
    {"kind": "gamma", "rate": 8.0, "cv": 2.0},
])
def test_arrival_modes_against_server_traces(served: Served, tiny_model_dir: Callable[[str], Path],
                                             arrival: dict[str, Any]) -> None:
    result = bench(served, tiny_model_dir("llama"), {"arrival": arrival, "num_requests": 8,
                                                      "lengths": {"kind": "uniform", "input": [8, 64], "output": [2, 8]}})
    against_server_traces(served, result)
    served.wait_idle()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("fmt", "arrival"), [
    ("azure", {"kind": "trace"}),
    ("mooncake", {"kind": "trace"}),
    ("sharegpt", {"kind": "poisson", "rate": 8.0}),
    ("sharegpt_lengths", {"kind": "concurrency", "concurrency": 2}),
])
def test_trace_formats(served: Served, tiny_model_dir: Callable[[str], Path], fmt: str,
                       arrival: dict[str, Any]) -> None:
    workload = {"arrival": arrival, "lengths": {"kind": "trace"}, "num_requests": 6, "time_scale": 0.05,
                "trace": {"path": str(sample_path(fmt)), "format": fmt}}  # type: ignore[arg-type]
    result = bench(served, tiny_model_dir("llama"), workload)
    against_server_traces(served, result)
    served.wait_idle()


@pytest.mark.timeout(300)
def test_the_command_line_sweeps_rates_writes_results_and_reports(served: Served, tiny_model_dir: Callable[[str], Path],
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    done = subprocess.run(
        [sys.executable, "-m", "hetpd.cli", "bench", "--url", served.url, "--model", "tiny", "--rates", "4,8",
         "--num-requests", "6", "--input-len", "32", "--output-len", "6", "--tokenizer", str(tiny_model_dir("llama")),
         "--slo-ttft-ms", "500", "--slo-tpot-ms", "100", "--out", str(out)], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    assert "ttft" in done.stdout and "goodput" in done.stdout and "6/6 done" in done.stderr
    body = json.loads(out.read_text())
    assert [r["rate"] for r in body["runs"]] == [4.0, 8.0] and all(len(r["requests"]) == 6 for r in body["runs"])
    report = subprocess.run([sys.executable, "-m", "hetpd.cli", "bench", "report", str(out), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "report.png").stat().st_size > 10_000
    assert "goodput req/s" in report.stdout and (tmp_path / "report" / "report.html").exists()


@pytest.mark.timeout(120)
def test_bad_input_gets_a_clear_message_and_a_result_file(tmp_path: Path, tiny_model_dir: Callable[[str], Path],
                                                          served: Served) -> None:
    out = tmp_path / "unreachable.json"
    done = subprocess.run([sys.executable, "-m", "hetpd.cli", "bench", "--url", "http://127.0.0.1:9", "--model", "m",
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot reach http://127.0.0.1:9" in done.stderr
    assert json.loads(out.read_text())["meta"]["error"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": []}\n{"timestamp": 1}\n')
    done = subprocess.run([sys.executable, "-m", "hetpd.cli", "bench", "--url", served.url, "--model", "tiny",
                           "--trace", str(bad), "--tokenizer", str(tiny_model_dir("llama")), "--out",
                           str(tmp_path / "b.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bad.jsonl:2" in done.stderr, done.stderr
