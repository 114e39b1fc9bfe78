"""``hetpd bench``: replay a workload against any OpenAI-compatible server and report.

    hetpd bench --url http://127.0.0.1:8000 --model NAME --rates 1,2,4 --input-len 256 --output-len 64
    hetpd bench --url ... --model ... --trace mooncake.jsonl --trace-times --num-requests 200
    hetpd bench --url ... --model ... --workload workload.yaml --slo-ttft-ms 500 --slo-tpot-ms 50
    hetpd bench report a.json b.json --out report/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hetpd.bench.metrics import SLO, table
from hetpd.bench.prompts import PromptBuilder
from hetpd.bench.report import save, write_report
from hetpd.bench.runner import RunResult, run
from hetpd.bench.workload import ConcurrencyArrival, WorkloadConfig, build_requests, load_workload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetpd bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL (the part before /v1)")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--workload", type=Path, default=None, help="workload YAML (flags below override nothing in it)")
    load = p.add_argument_group("arrivals (pick one)")
    load.add_argument("--concurrency", type=int, default=None, help="fixed number of requests in flight")
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s")
    load.add_argument("--rates", default=None, help="sweep: comma-separated rates, one run each")
    load.add_argument("--burstiness", type=float, default=None, help="gamma arrivals with this CV (1 = Poisson)")
    load.add_argument("--trace-times", action="store_true", help="send at the trace's own timestamps")
    load.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps (0.5 = twice as fast)")
    lengths = p.add_argument_group("lengths")
    lengths.add_argument("--input-len", type=int, default=128)
    lengths.add_argument("--output-len", type=int, default=64)
    lengths.add_argument("--input-range", default=None, help="uniform lengths: LO,HI")
    lengths.add_argument("--output-range", default=None, help="uniform lengths: LO,HI")
    lengths.add_argument("--trace", type=Path, default=None, help="Azure CSV, Mooncake JSONL or ShareGPT JSON")
    lengths.add_argument("--trace-format", default=None, choices=["azure", "mooncake", "sharegpt", "sharegpt_lengths"])
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--warmup", type=int, default=2,
                   help="requests sent one by one before measuring (first-call costs stay out of the numbers)")
    p.add_argument("--seed", type=int, default=0, help="seeds lengths, arrivals and prompts (a --workload file has its own)")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="HF folder whose tokenizer builds the prompts (default: the embedded SmolLM2's)")
    p.add_argument("--out", type=Path, default=Path("bench-result.json"))
    p.add_argument("--name", default=None, help="label of this run in reports")
    return p


def workload_from_args(args: argparse.Namespace) -> WorkloadConfig:
    if args.workload is not None:
        return load_workload(args.workload)
    raw: dict[str, Any] = {"num_requests": args.num_requests, "seed": args.seed, "time_scale": args.time_scale}
    if args.trace is not None:
        raw["trace"] = {"path": str(args.trace), "format": args.trace_format}
    if args.trace_times:
        raw["arrival"] = {"kind": "trace"}
    elif args.concurrency is not None:
        raw["arrival"] = {"kind": "concurrency", "concurrency": args.concurrency}
    elif args.burstiness is not None:
        raw["arrival"] = {"kind": "gamma", "rate": args.rate or 1.0, "cv": args.burstiness}
    else:
        raw["arrival"] = {"kind": "poisson", "rate": args.rate or 1.0}
    if args.trace is not None:
        raw["lengths"] = {"kind": "trace"}
    elif args.input_range or args.output_range:
        raw["lengths"] = {"kind": "uniform", "input": _pair(args.input_range, args.input_len),
                          "output": _pair(args.output_range, args.output_len)}
    else:
        raw["lengths"] = {"kind": "fixed", "input": args.input_len, "output": args.output_len}
    return WorkloadConfig.model_validate(raw)


def _pair(text: str | None, default: int) -> list[int]:
    if text is None:
        return [default, default]
    lo, hi = (int(v) for v in text.split(","))
    return [lo, hi]


def _tokenizer(path: Path | None) -> Any:
    from hetpd.models.tokenizer import Tokenizer

    if path is None:
        from hetpd.models.default_model import default_model_dir

        path = default_model_dir(progress=lambda m: print(m, file=sys.stderr))
    return Tokenizer.from_dir(path)


def preflight(url: str, api_key: str | None) -> str | None:
    """None if the server answers /v1/models, else why not (a clear message instead of N errors)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/v1/models", headers=headers),
                                    timeout=10) as response:
            json.loads(response.read())
        return None
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code} on /v1/models ({exc.read().decode(errors='replace')[:200]})"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"cannot reach {url}: {exc}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parser().parse_args(argv)
    problem = preflight(args.url, args.api_key)
    if problem is not None:
        print(f"hetpd bench: {problem}", file=sys.stderr)
        save(args.out, {"url": args.url, "model": args.model, "name": args.name, "error": problem}, [])
        return 2
    try:
        workload = workload_from_args(args)
        tokenizer = _tokenizer(args.tokenizer)
        specials = frozenset(int(i) for i in tokenizer.backend.get_added_tokens_decoder())
        def builder(salt: str) -> PromptBuilder:  # each run its own unique prompts: no cross-run prefix hits
            return PromptBuilder(tokenizer.vocab_size, specials, seed=workload.seed, salt=salt)

        count = lambda text: len(tokenizer.encode(text))  # noqa: E731
        rates: list[float | None] = [float(r) for r in args.rates.split(",")] if args.rates else [None]
        # Every run's requests up front: a workload that cannot be built fails before any load is sent.
        sweep = [(rate, build_requests(workload, rate=rate, count_tokens=count)) for rate in rates]
    except ValueError as exc:
        print(f"hetpd bench: {exc}", file=sys.stderr)
        return 2
    slo = SLO(ttft=(args.slo_ttft_ms or float("inf")) / 1000, tpot=(args.slo_tpot_ms or float("inf")) / 1000)
    meta = {"url": args.url, "model": args.model, "name": args.name or args.out.stem,
            "workload": workload.model_dump(mode="json"), "slo_ms": {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}}
    runs: list[RunResult] = []
    if args.warmup > 0:
        warm = sweep[0][1][: args.warmup]
        warm_prompts = builder("warmup")
        asyncio.run(run(warm, [warm_prompts.build(s) for s in warm], args.url, args.model, api_key=args.api_key,
                        concurrency=1, progress=None))
    concurrency = workload.arrival.concurrency if isinstance(workload.arrival, ConcurrencyArrival) else None
    for index, (rate, specs) in enumerate(sweep):
        run_prompts = builder(f"run-{index}" if index else "")
        prompts = [run_prompts.build(spec) for spec in specs]
        label = f"rate {rate:g}/s" if rate is not None else ""
        result = asyncio.run(run(specs, prompts, args.url, args.model, api_key=args.api_key, concurrency=concurrency,
                                 rate=rate, slo=slo, label=label))
        runs.append(result)
        save(args.out, meta, runs)  # after every run: a later failure keeps what was measured
        print(table(result.summary, f"{label}: " if label else ""))
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hetpd bench report", description="compare result files side by side")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench-report"))
    args = p.parse_args(argv)
    try:
        png, page = write_report(args.results, args.out)
    except (ValueError, RuntimeError) as exc:
        print(f"hetpd bench report: {exc}", file=sys.stderr)
        return 2
    from hetpd.bench.report import compare_table

    print(compare_table(args.results))
    print(f"wrote {png} and {page}")
    return 0
