#!/usr/bin/env python
"""Overload soak: a deployment driven at twice the rate it sustains keeps answering at the rate it sustains.

Starts `hetpd serve` (real processes), measures the answered rate it sustains with a closed loop
of clients (``--concurrency``, default 2x a worker's ``max_num_seqs``), then sends ``--requests``
Poisson arrivals at ``--factor`` times that rate, then idles. Both rates count answers once the
pipeline is full (``--settle-s`` into the phase) until the phase's last arrival; output lengths
vary around ``--max-tokens`` so batches do not finish in lock-step waves. Reports: the answered rate during
the soak against the sustained one, how the rest were refused (503 + Retry-After, and how early),
the router's and each worker's RSS over time (flat after warm-up?), and the pages and leases
held once idle (zero?).

    .venv/bin/python benchmarks/overload.py [--requests 2000] [--factor 2] [--model DIR]

Writes benchmarks/results/overload/{overload.json,overload.png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from hetpd.models.default_model import default_model_dir
from hetpd.serve.local import local_server, worker_pids

OUT = Path(__file__).parent / "results" / "overload"
PROMPT_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()


@dataclass
class Outcome:
    sent: float  # seconds since the phase started
    ended: float
    status: int  # 0: transport error or client timeout
    retry_after: str | None
    tokens: int
    error: str | None


def request(rng: random.Random, model: str, words: int, max_tokens: int) -> dict[str, Any]:
    """A completion of ``max_tokens`` on average (half to one and a half times): lengths that
    differ, so a full batch does not finish in one lock-step wave."""
    return {"model": model, "prompt": " ".join(rng.choice(PROMPT_WORDS) for _ in range(words)),
            "max_tokens": rng.randint(max_tokens // 2, max_tokens * 3 // 2), "temperature": 0, "ignore_eos": True}


async def one(client: httpx.AsyncClient, body: dict[str, Any], origin: float, timeout: float) -> Outcome:
    sent = time.monotonic() - origin
    try:
        response = await client.post("/v1/completions", json=body, timeout=timeout)
        status = response.status_code
        payload = response.json()
        tokens = payload.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
        error = None if status == 200 else str(payload.get("error", {}).get("message"))[:200]
        return Outcome(sent, time.monotonic() - origin, status, response.headers.get("retry-after"), tokens, error)
    except (httpx.HTTPError, ValueError) as exc:
        return Outcome(sent, time.monotonic() - origin, 0, None, 0, f"{type(exc).__name__}: {exc}"[:200])


async def closed_loop(url: str, model: str, concurrency: int, seconds: float, words: int, max_tokens: int,
                      timeout: float) -> list[Outcome]:
    rng = random.Random(1)
    origin = time.monotonic()
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def loop() -> None:
            while time.monotonic() - origin < seconds:
                outcomes.append(await one(client, request(rng, model, words, max_tokens), origin, timeout))
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes


async def open_loop(url: str, model: str, rate: float, count: int, words: int, max_tokens: int,
                    timeout: float) -> list[Outcome]:
    rng = random.Random(2)
    origin = time.monotonic()
    tasks = []
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=4096)) as client:
        at = 0.0
        for _ in range(count):
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, origin + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, request(rng, model, words, max_tokens), origin, timeout)))
        return list(await asyncio.gather(*tasks))


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def sample_memory(server_pid: int, samples: list[dict[str, float]], origin: float,
                        stop: asyncio.Event) -> None:
    """Every 2 s: RSS (MiB) and CPU seconds so far of the router, each worker and this client."""
    while not stop.is_set():
        row = {"t": time.monotonic() - origin, "router": rss_mb(server_pid), "cpu:router": cpu_s(server_pid),
               "cpu:client": cpu_s(os.getpid())}
        for worker, pid in worker_pids(server_pid).items():
            row[worker] = rss_mb(pid)
            row[f"cpu:{worker}"] = cpu_s(pid)
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), timeout=2.0)
        except asyncio.TimeoutError:
            pass


def cpu_share(memory: list[dict[str, float]], start: float, end: float) -> dict[str, float]:
    """Cores each process used on average between ``start`` and ``end`` (seconds since origin)."""
    inside = [m for m in memory if start <= m["t"] <= end]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    return {key[4:]: round((last[key] - first[key]) / (last["t"] - first["t"]), 3)
            for key in first if key.startswith("cpu:") and key in last}


def steady_rate(outcomes: list[Outcome], start: float, end: float) -> float:
    """Answers per second that ended within [start, end]: the rate once the pipeline is full."""
    return sum(1 for o in outcomes if o.status == 200 and start <= o.ended <= end) / (end - start)


def summarise(outcomes: list[Outcome], settle_s: float) -> dict[str, Any]:
    answered = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    other = [o for o in outcomes if o.status not in (200, 503)]
    span = max(o.ended for o in answered) - min(o.sent for o in outcomes) if answered else float("nan")
    last_arrival = max(o.sent for o in outcomes)
    return {
        "requests": len(outcomes), "answered": len(answered), "refused_503": len(refused), "other": len(other),
        # While the overload lasts: from settle_s after the first arrival to the last arrival.
        "answered_per_s": steady_rate(outcomes, settle_s, last_arrival) if answered else 0.0,
        "answered_per_s_whole_run": len(answered) / span if answered else 0.0, "span_s": span,
        "refused_with_retry_after": sum(1 for o in refused if o.retry_after),
        "refusal_seconds_median": statistics.median([o.ended - o.sent for o in refused]) if refused else None,
        "refusal_seconds_p99": (sorted(o.ended - o.sent for o in refused)[int(0.99 * (len(refused) - 1))]
                                if refused else None),
        "answered_latency_median_s": statistics.median([o.ended - o.sent for o in answered]) if answered else None,
        "errors": sorted({o.error or "" for o in other})[:5],
    }


def plot(soak: list[Outcome], memory: list[dict[str, float]], sustained: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=False)
    end = max(o.ended for o in soak)
    bins = [i * 10.0 for i in range(int(end // 10) + 2)]
    answered = [o.ended for o in soak if o.status == 200]
    refused = [o.ended for o in soak if o.status == 503]
    top.hist([answered, refused], bins=bins, label=["answered", "refused (503)"], stacked=True,
             weights=[[0.1] * len(answered), [0.1] * len(refused)])
    top.axhline(sustained, color="k", linestyle="--", label=f"sustained {sustained:.2f}/s")
    top.set_xlabel("seconds into the soak")
    top.set_ylabel("requests per second")
    top.legend()
    top.set_title("Responses per 10 s at twice the sustainable rate")
    keys = [k for k in memory[0] if k != "t" and not k.startswith("cpu:")] if memory else []
    for key in keys:
        bottom.plot([m["t"] for m in memory], [m.get(key, float("nan")) for m in memory], label=key)
    bottom.set_xlabel("seconds since the server came up")
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_ylim(bottom=0)
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace, url: str, server_pid: int) -> dict[str, Any]:
    origin = time.monotonic()
    memory: list[dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(server_pid, memory, origin, stop))
    print("== warm-up", file=sys.stderr, flush=True)
    await closed_loop(url, args.served_name, 4, 15, args.prompt_words, args.max_tokens, args.timeout)
    print(f"== sustained rate: closed loop of {args.concurrency} clients for {args.capacity_s:.0f}s",
          file=sys.stderr, flush=True)
    capacity_started = time.monotonic() - origin
    capacity = await closed_loop(url, args.served_name, args.concurrency, args.capacity_s, args.prompt_words,
                                 args.max_tokens, args.timeout)
    sustained = steady_rate(capacity, args.settle_s, args.capacity_s)
    rate = args.factor * sustained
    print(f"   sustained {sustained:.2f} answered/s; soak: {args.requests} requests at {rate:.2f}/s",
          file=sys.stderr, flush=True)
    soak_started = time.monotonic() - origin
    soak = await open_loop(url, args.served_name, rate, args.requests, args.prompt_words, args.max_tokens,
                           args.timeout)
    soak_ended = time.monotonic() - origin
    print("== idle", file=sys.stderr, flush=True)
    await asyncio.sleep(args.idle_s)
    async with httpx.AsyncClient(base_url=url) as client:
        workers = (await client.get("/v1/admin/workers")).json()
    stop.set()
    await sampler
    summary = summarise(soak, args.settle_s)
    summary["sustained_per_s"] = sustained
    summary["offered_per_s"] = rate
    summary["answered_over_sustained"] = summary["answered_per_s"] / sustained
    after_warmup = [m for m in memory if m["t"] >= soak_started]
    summary["rss_mb"] = {key: {"soak_start": after_warmup[0][key], "max": max(m.get(key, 0.0) for m in after_warmup),
                               "end": after_warmup[-1][key]}
                         for key in after_warmup[0] if key != "t" and not key.startswith("cpu:")} if after_warmup else {}
    summary["cpu_share"] = {"capacity": cpu_share(memory, capacity_started, soak_started),
                            "soak": cpu_share(memory, soak_started, soak_ended)}
    summary["idle_workers"] = {w: {k: v.get(k) for k in ("pages_in_use", "live_leases", "held", "reserved")}
                               for w, v in workers.items()}
    plot(soak, memory, sustained, OUT / "overload.png")
    (OUT / "overload.json").write_text(json.dumps({"summary": summary, "capacity": [asdict(o) for o in capacity],
                                                   "soak": [asdict(o) for o in soak], "memory": memory}, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--capacity-s", type=float, default=90.0)
    parser.add_argument("--idle-s", type=float, default=15.0)
    parser.add_argument("--settle-s", type=float, default=20.0,
                        help="rates count answers from this long after a phase starts (the pipeline filling up)")
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-name", default="smollm2")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model = args.model or str(default_model_dir())
    config = OUT / "deploy.yaml"
    config.write_text(yaml.safe_dump({"model": model, "served_model_name": args.served_name, "pools": [
        {"name": "prefill", "role": "prefill", "dtype": "float32", "kv_cache_dtype": "float32", "num_kv_blocks": 512},
        {"name": "decode", "role": "decode", "dtype": "bfloat16", "kv_cache_dtype": "int8", "num_kv_blocks": 1024}]}))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with local_server(config, OUT / "serve.log") as server:
        summary = asyncio.run(run(args, server.url, server.process.pid))
    summary["commit"] = commit
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
