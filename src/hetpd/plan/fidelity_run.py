"""Run the simulator's fidelity check on this machine: profile, serve, bench, simulate, compare.

For each deployment (colocated, and one prefill + one decode worker) it
1. runs ``hetpd profile --threads T`` alone, with the thread count ``hetpd serve`` will give each
   worker (without calibration loads: beside as many busy engines as the deployment has other
   workers, ``--neighbours N``),
2. starts ``hetpd serve --step-trace`` on that deployment (real router and worker processes),
3. serves calibration loads of their own requests and refits each pool's step model to the steps
   its workers served, its interference to the steps they took beside a busy worker, and the
   worker loop's own time around each step (:mod:`hetpd.plan.served_steps`),
4. measures what serving adds before the first token with a few requests sent one at a time
   (:class:`ServingOverhead`: HTTP, tokenizer, the router's dispatch; no step trace sees it),
5. runs ``hetpd bench`` at each request rate (Poisson arrivals, the workload below),
6. simulates the very same requests on the deployment as :func:`~hetpd.plan.fidelity.sim_config_for`
   sees it, with the refitted step models and the profiled local transport as the link,
and returns one :class:`~hetpd.plan.fidelity.Agreement` per load point, with how the load point's
served steps compared with the models. It picks light, medium and near-saturation loads as
fractions of the capacity the simulator predicts, so the operating points come from the model,
not from the measurement.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hetpd.bench.metrics import SLO, Distribution, Summary
from hetpd.bench.report import load as load_bench
from hetpd.bench.workload import build_requests, parse_workload
from hetpd.core.step_work import STEP_TRACE_ENV
from hetpd.plan.fidelity import Agreement, agreement, sim_config_for
from hetpd.plan.profile import load_steps
from hetpd.plan.served_steps import ServedCosts, load_served_costs, refit, served_steps
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult, simulate
from hetpd.plan.spec import ModelShape, load_catalog
from hetpd.serve.deploy import parse_deployment
from hetpd.serve.launcher import worker_threads
from hetpd.serve.local import local_server

DEPLOYMENTS: dict[str, list[dict[str, Any]]] = {
    "colocated": [{"name": "colocated", "role": "colocated", "num_kv_blocks": 1024}],
    "1P1D": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 512},
             {"name": "decode", "role": "decode", "num_kv_blocks": 1024}],
}
LOADS = (0.3, 0.6, 0.85)  # fractions of the predicted capacity: light, medium, near saturation


@dataclass(frozen=True)
class FidelityConfig:
    modes: tuple[str, ...] = ("colocated", "1P1D")
    num_requests: int = 30
    input_range: tuple[int, int] = (64, 256)
    output_range: tuple[int, int] = (16, 48)
    loads: tuple[float, ...] = LOADS
    slo: SLO = SLO(ttft=2.0, tpot=0.2)
    quick_profile: bool = False
    seed: int = 0
    # Loads (fractions of the profiled capacity) served first, one after the other, each on its own
    # requests, whose steps the step model is refitted to (`hetpd profile --served-steps`); empty:
    # the engine profile alone. A high one makes the batch sizes near saturation (a decode step of 7
    # sequences amid mixed contexts ran 1.2-1.4x the profile's line at 0.85 of capacity, and a
    # calibration at 0.6 alone never batched more than 5).
    calibration_loads: tuple[float, ...] = (0.6, 0.9)
    # A load point whose served steps ran more than this fraction off the calibrated step model
    # (the machine itself sped up or slowed down since the calibration) is measured again, with
    # fresh requests, up to ``drift_retries`` times; the discarded attempts are kept. None: never.
    max_drift: float | None = 0.10
    drift_retries: int = 2


PROBE_REQUESTS = 4


@dataclass(frozen=True)
class ServingOverhead:
    """What serving adds to the engine's own steps, per step, as seen with requests sent one at a
    time (no queueing, no batching): HTTP, router and worker loop before the first token, and the
    worker loop, streaming and the handoff's control round trips per later token. Measured on
    its own requests, never on the load points it is then compared with."""

    per_first_token: float
    per_token: float

    def applied(self, sim: SimConfig) -> SimConfig:
        """The simulator's config with these overheads on the step models: the first token's on the
        prefill pool's steps, the later tokens' on the decode pool's (a colocated pool: the latter)."""
        def more(pool: PoolSpec, extra: float) -> PoolSpec:
            assert pool.steps is not None, "the serving overhead applies to measured step models"
            return dataclasses.replace(pool, steps=dataclasses.replace(pool.steps, overhead=pool.steps.overhead + extra))

        if sim.colocated:
            return dataclasses.replace(sim, prefill=more(sim.prefill, self.per_token))
        return dataclasses.replace(sim, prefill=more(sim.prefill, self.per_first_token),
                                   decode=more(sim.decode, self.per_token))


@dataclass(frozen=True)
class ModeResult:
    mode: str
    capacity: float  # requests/s the simulator predicts at saturation
    overhead: ServingOverhead
    points: tuple[Agreement, ...]
    simulated: tuple[SimResult, ...]
    measured: tuple[Summary, ...]
    # Per load point, per pool: the served steps' total wall time over what the step model the
    # simulator used predicts for the same steps (1.0: the steps cost what the simulator assumed).
    step_ratios: tuple[dict[str, float], ...] = ()
    # Attempts measured again because the machine drifted from its calibration (see max_drift).
    discarded: tuple[tuple[Agreement, dict[str, float]], ...] = ()


def workload(config: FidelityConfig, rate: float, run: int = 0) -> dict[str, Any]:
    """The requests of one load point; each run its own seed, so no run meets another's prompts
    in the server's prefix cache (which the simulator does not model)."""
    return {"arrival": {"kind": "poisson", "rate": rate}, "num_requests": config.num_requests,
            "seed": config.seed + run,
            "lengths": {"kind": "uniform", "input": list(config.input_range), "output": list(config.output_range)}}


def _hetpd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hetpd.cli", *args]


def predicted_capacity(sim_config: SimConfig, config: FidelityConfig) -> float:
    """Finished requests per second when every request arrives at once (the saturated throughput)."""
    raw = workload(config, 1.0)
    specs = [dataclasses.replace(s, at=0.0) for s in build_requests(parse_workload(raw))]
    return simulate(sim_config, specs).throughput


def serving_overhead(sim_config: SimConfig, url: str, config: FidelityConfig, out: Path) -> ServingOverhead:
    """Send :data:`PROBE_REQUESTS` requests one at a time and compare their median TTFT and TPOT with
    the simulator's for each request alone; the excess (never negative) is serving's own cost."""
    lengths = {"kind": "fixed", "input": sum(config.input_range) // 2, "output": sum(config.output_range) // 2}
    raw = {"arrival": {"kind": "concurrency", "concurrency": 1}, "num_requests": PROBE_REQUESTS,
           "seed": config.seed + 1000, "lengths": lengths}
    measured = _bench(url, raw, config, out.with_suffix(".yaml"), out)
    alone = simulate(sim_config, [dataclasses.replace(build_requests(parse_workload(raw))[0], at=0.0)])
    return ServingOverhead(max(0.0, measured.ttft.p50 - alone.ttft.p50), max(0.0, measured.tpot.p50 - alone.tpot.p50))


def run_fidelity(config: FidelityConfig, out: Path, log: Callable[[str], None] = lambda m: print(m, flush=True)
                 ) -> list[ModeResult]:
    from hetpd.models.config import ModelConfig
    from hetpd.models.default_model import default_model_dir

    out.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir(progress=log)
    shape = ModelShape.from_config(ModelConfig.from_dir(model_dir), "smollm2-135m")
    results = []
    for mode in config.modes:
        pools = DEPLOYMENTS[mode]
        threads = worker_threads(len(pools))  # what `hetpd serve` gives each worker
        calibration = out / f"calibration-{mode}.yaml"
        log(f"[fidelity] {mode}: hetpd profile --threads {threads}")
        # Calibrated on served steps, the engine is profiled alone and the served steps measure how
        # much the deployment's workers slow each other; without, as many busy neighbours run beside
        # the profile as the deployment has other workers.
        neighbours = 0 if config.calibration_loads else len(pools) - 1
        profile_args = ["profile", "--threads", str(threads), "--neighbours", str(neighbours),
                        "--out", str(calibration)]
        with (out / f"profile-{mode}.log").open("w") as profile_log:
            subprocess.run(_hetpd(*profile_args, *(["--quick"] if config.quick_profile else [])), check=True,
                           stdout=subprocess.DEVNULL, stderr=profile_log)
        catalog = load_catalog([calibration])
        deploy = parse_deployment({"model": str(model_dir), "served_model_name": "smollm2", "pools": pools})
        steps = {p["name"]: load_steps(str(calibration)) for p in pools}
        served: dict[str, ServedCosts] = {}
        link = catalog.link("local_shm")
        # Lease messages go worker -> router -> worker: two hops of the profiled local TCP latency.
        control = 2 * catalog.link("local_tcp").latency_us * 1e-6
        deploy_path = out / f"{mode}.deploy.yaml"
        deploy_path.write_text(yaml.safe_dump(deploy.model_dump(mode="json", exclude_defaults=True)))
        trace_dir = out / f"steps-{mode}"
        shutil.rmtree(trace_dir, ignore_errors=True)
        trace_dir.mkdir()
        points, simulated, measured, ratios = [], [], [], []
        with local_server(deploy_path, out / f"serve-{mode}.log", env={STEP_TRACE_ENV: str(trace_dir)}) as server:
            if config.calibration_loads:
                profiled = sim_config_for(deploy, shape, catalog.accelerator("local"), steps, link,
                                          control_latency_s=control)
                files = _calibrate_on_served_steps(config, mode, profiled, list(steps), server.url, calibration,
                                                   trace_dir, out, log)
                steps = {pool: load_steps(str(path)) for pool, path in files.items()}
                served = {pool: load_served_costs(path) for pool, path in files.items()}
            sim_config = sim_config_for(deploy, shape, catalog.accelerator("local"), steps, link, served, control)
            probe = serving_overhead(sim_config, server.url, config, out / f"probe-{mode}.json")
            log(f"[fidelity] {mode}: serving overhead beyond the engine's steps, from {PROBE_REQUESTS} requests "
                f"one at a time: {1000 * probe.per_first_token:.1f} ms to the first token, "
                f"{1000 * probe.per_token:.1f} ms per later token")
            if config.calibration_loads:
                # Served steps already carry what serving adds between tokens; adding the probe's
                # per-token excess too would count it twice. Before the first token (HTTP, the
                # tokenizer, the router's dispatch) no step trace sees it: that part applies.
                probe = dataclasses.replace(probe, per_token=0.0)
            sim_config = probe.applied(sim_config)
            capacity = predicted_capacity(sim_config, config)
            rates = [round(capacity * f, 3) for f in config.loads]
            log(f"[fidelity] {mode}: predicted capacity {capacity:.2f} req/s; rates {rates}")
            specs = {pool: sim_config.prefill if role in ("prefill", "colocated") else sim_config.decode
                     for pool, role in ((p["name"], p["role"]) for p in pools)}
            discarded = []
            for run, rate in enumerate(rates):
                for attempt in range(config.drift_retries + 1 if config.max_drift is not None else 1):
                    seen = _trace_lengths(trace_dir)
                    raw = workload(config, rate, run + 10 * attempt)  # fresh prompts for every attempt
                    name = f"{mode}-{rate}" + (f"-try{attempt}" if attempt else "")
                    summary = _bench(server.url, raw, config, out / f"workload-{name}.yaml", out / f"bench-{name}.json",
                                     log)
                    result = simulate(sim_config, build_requests(parse_workload(raw)), config.slo)
                    point = agreement(mode, rate, summary, result)
                    ratio = {pool: _served_over_model(trace_dir, pool, seen, spec) for pool, spec in specs.items()}
                    log(f"[fidelity] {point.row()}   served steps / step model: "
                        + ", ".join(f"{pool} {r:.2f}" for pool, r in ratio.items()))
                    drifted = config.max_drift is not None and any(abs(r - 1) > config.max_drift for r in ratio.values())
                    if not drifted or attempt == config.drift_retries:
                        break
                    # Decided on the steps' speed alone, never on the latencies being compared.
                    log(f"[fidelity] the machine ran more than {config.max_drift:.0%} off its calibration: "
                        "measuring this load point again with fresh requests")
                    discarded.append((point, ratio))
                points.append(point)
                simulated.append(result)
                measured.append(summary)
                ratios.append(ratio)
        results.append(ModeResult(mode, capacity, probe, tuple(points), tuple(simulated), tuple(measured),
                                  tuple(ratios), tuple(discarded)))
    return results


def _bench(url: str, raw: dict[str, Any], config: FidelityConfig, workload_path: Path, out: Path,
           log: Callable[[str], None] = lambda message: None) -> Summary:
    """``hetpd bench`` of the workload ``raw`` against ``url``; its summary."""
    workload_path.write_text(yaml.safe_dump(raw))
    arrival = raw["arrival"]
    pace = f"{arrival['rate']} req/s" if "rate" in arrival else f"{arrival['kind']} {arrival.get('concurrency', '')}"
    log(f"[fidelity] hetpd bench at {pace} ({raw['num_requests']} requests)")
    subprocess.run(_hetpd("bench", "--url", url, "--model", "smollm2", "--workload", str(workload_path),
                          "--slo-ttft-ms", str(1000 * config.slo.ttft), "--slo-tpot-ms", str(1000 * config.slo.tpot),
                          "--out", str(out)), check=True, stdout=subprocess.DEVNULL)
    return _summary(load_bench(out)["runs"][-1]["summary"])


def _calibrate_on_served_steps(config: FidelityConfig, mode: str, sim_config: SimConfig, pools: list[str], url: str,
                               calibration: Path, trace_dir: Path, out: Path, log: Callable[[str], None]
                               ) -> dict[str, Path]:
    """Serve the calibration loads (their own requests, never a load point's) and refit each pool's step
    model to the engine profile plus the steps that pool's workers served alone, its interference
    to the steps they served beside a busy worker, and its loop cost to the worker loop's time
    around each step (:mod:`hetpd.plan.served_steps`).
    Returns each pool's refitted calibration file."""
    capacity = predicted_capacity(sim_config, config)
    for index, load in enumerate(config.calibration_loads):
        raw = {**workload(config, round(capacity * load, 3)), "seed": config.seed + 500 + index}
        name = f"{mode}-calibration" + (f"-{index}" if index else "")
        _bench(url, raw, config, out / f"workload-{name}.yaml", out / f"bench-{name}.json", log)
    files = {}
    for pool in pools:
        files[pool] = out / f"calibration-{mode}-{pool}.yaml"
        refitted = refit(calibration, served_steps(trace_dir, f"{pool}-"), files[pool])  # worker ids: <pool>-<index>
        log(f"[fidelity] {mode}: {pool}: {refitted.summary()}")
    return files


def _trace_lengths(trace_dir: Path) -> dict[str, int]:
    """Steps recorded so far, per worker."""
    return {f.stem: len(f.read_text().splitlines()) for f in trace_dir.glob("*.jsonl")}


def _served_over_model(trace_dir: Path, pool: str, seen: dict[str, int], pool_spec: PoolSpec) -> float:
    """Total wall time of the steps ``pool``'s workers served after the first ``seen`` of each, over
    what the simulator's model of the pool (steps and interference) predicts for the same steps:
    how fast the engine ran. The loop's own time is left out; it is small and reads the router's
    pace as much as the machine's."""
    assert pool_spec.steps is not None
    wall = predicted = 0.0
    counts: dict[str, int] = {}
    for step in served_steps(trace_dir, f"{pool}-"):
        counts[step.worker] = counts.get(step.worker, 0) + 1
        if counts[step.worker] > seen.get(step.worker, 0):
            wall += step.seconds
            predicted += pool_spec.slowed(pool_spec.steps.seconds(step.work), step.beside_busy)
    return wall / predicted if predicted > 0 else float("nan")


def _summary(raw: dict[str, Any]) -> Summary:
    """A bench result file's summary back as a :class:`Summary` (the fields the comparison reads)."""
    fields = {name: Distribution(**raw[name]) for name in ("ttft", "tpot", "itl", "e2e", "send_lag")}
    slo = raw.get("slo") or {}
    return Summary(raw["requests"], raw["succeeded"], raw["duration_s"], raw["request_throughput"],
                   raw["output_throughput"], raw["goodput"], raw["slo_attainment"], **fields,
                   errors=raw.get("errors") or {},
                   slo=SLO(*(float("inf") if slo.get(k) is None else slo[k] for k in ("ttft", "tpot"))))
