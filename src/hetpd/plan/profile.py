"""``hetpd profile``: measure this machine and the local engine; write a calibration file.

The planner's roofline needs two efficiency factors per device (achieved fraction of peak
compute, and of peak memory bandwidth); its simulator can also take the engine's step time
directly. This measures the machine's peaks (a large matmul, a large copy), then engine steps:
prompts of several lengths, decode batches of several sizes over two context lengths, and mixed
steps (a prompt chunk beside decodes). It reports the efficiencies and fits a step model
(:class:`~hetpd.plan.step_model.MeasuredSteps`) to every measured step. The file it writes is a
catalog file (an accelerator entry for this machine) plus both, which a scenario names under
``calibration:``.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hetpd.core.step_work import StepWork
from hetpd.plan.calibrated import shape_of
from hetpd.plan.step_model import MeasuredSteps, fit_steps_by_batch


@dataclass(frozen=True)
class Calibration:
    compute: float
    memory: float
    accelerator: dict[str, Any]
    measurements: dict[str, Any]
    steps: MeasuredSteps  # the engine's step time, fitted to every step measured here
    step_fit_error: float  # median relative error of that fit over the measured steps
    threads: int
    links: tuple[dict[str, Any], ...] = ()  # catalog entries of the local transports, as measured
    neighbours: int = 0  # busy engine processes that ran beside the step measurements
    # What the step model was measured on: the model's dimensions (plan.calibrated.SHAPE_FIELDS)
    # and the format the engine computed in; the planner uses the step model only for the same.
    model_shape: tuple[tuple[str, int], ...] = ()
    compute_fmt: str = "fp32"


def _best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def neighbour_loop(model_dir: str | None, dtype: str) -> None:
    """Stand in for another serving worker on this host, until killed: one thread running the
    engine on a 256-token prompt and 7 decode steps after it, again and again. Prints ``ready``
    once the first round is done."""
    import torch

    from hetpd.engine.config import EngineConfig
    from hetpd.engine.engine import Engine
    from hetpd.sampling_params import SamplingParams

    torch.set_num_threads(1)
    engine = Engine.from_config(EngineConfig(model=model_dir, dtype=dtype, max_num_batched_tokens=2048))
    vocab = engine.model_config.vocab_size
    for run in itertools.count():
        request_id = f"n{run}"
        engine.add_request(request_id, [5 + ((i * 11 + run * 17) % (vocab - 10)) for i in range(256)],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        while engine.is_running(request_id):
            engine.step()
        if run == 0:
            print("ready", flush=True)


@contextmanager
def busy_neighbours(count: int, model_dir: Path | None, dtype: str) -> Iterator[None]:
    """``count`` :func:`neighbour_loop` processes running for the duration of the block."""
    code = f"from hetpd.plan.profile import neighbour_loop; neighbour_loop({str(model_dir) if model_dir else None!r}, {dtype!r})"
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(count)]
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a busy neighbour for `hetpd profile --neighbours` failed to start")
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def profile(model_dir: Path | None, dtype: str = "float32", quick: bool = False, threads: int | None = None,
            transports: bool = True, neighbours: int = 0,
            log: Any = lambda m: print(m, file=sys.stderr, flush=True)) -> Calibration:
    """Measure peaks, then engine steps: whole prompts, decode batches over contexts, and mixed
    steps (a prompt chunk beside decodes, as a colocated engine runs them); then, with
    ``transports``, the KV transports between two processes (links ``local_shm``, ``local_tcp``).

    ``neighbours``: how many other workers will share this host (a 1P1D deployment on one machine:
    1). As many busy engine processes run beside the step measurements, because workers on one
    host share its memory bandwidth and caches (and, in a VM, often a physical core): measured
    here, a 1-thread decode step took ~50 ms alone and ~62 ms beside a busy prefill worker."""
    with busy_neighbours(neighbours, model_dir, dtype):
        return _profile(model_dir, dtype, quick, threads, transports, neighbours, log)


def _profile(model_dir: Path | None, dtype: str, quick: bool, threads: int | None, transports: bool,
             neighbours: int, log: Any) -> Calibration:
    import torch

    from hetpd.engine.config import EngineConfig
    from hetpd.engine.engine import Engine
    from hetpd.plan.spec import ModelShape
    from hetpd.sampling_params import SamplingParams

    if threads is not None:
        torch.set_num_threads(threads)  # as `hetpd serve` gives each worker (HETPD_TORCH_THREADS)
    repeats = 3
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    size = 2048  # large enough to reach the matmul peak on small machines too
    a, b = torch.randn(size, size, dtype=torch_dtype), torch.randn(size, size, dtype=torch_dtype)
    peak_flops = 2 * size**3 / _best(lambda: torch.mm(a, b), repeats)
    n = (64 if quick else 256) * (1 << 20) // 4
    src, dst = torch.randn(n), torch.empty(n)
    peak_bw = 2 * 4 * n / _best(lambda: dst.copy_(src), repeats)
    log(f"[profile] machine ({torch.get_num_threads()} threads, {neighbours} busy neighbours): "
        f"{peak_flops / 1e12:.3f} TFLOP/s ({dtype} matmul), {peak_bw / 1e9:.1f} GB/s (copy)")

    # The deployments' chunk budget, so a measured prompt runs in one step as it does when served.
    engine = Engine.from_config(EngineConfig(model=None if model_dir is None else str(model_dir), dtype=dtype,
                                             max_num_batched_tokens=2048))
    config = engine.model_config
    shape = ModelShape.from_config(config, "local")
    weights = shape.params_total_b * 1e9 * (4 if dtype == "float32" else 2)
    counter = iter(range(10**9))
    samples: list[tuple[StepWork, float]] = []

    def fresh_prompt(length: int) -> list[int]:
        run = next(counter)  # a different prompt each run: the prefix cache must not serve it
        return [5 + ((i * 7 + run * 13) % (config.vocab_size - 10)) for i in range(length)]

    def timed_step() -> float:
        start = time.perf_counter()
        engine.step()
        return time.perf_counter() - start

    def decoding_work() -> StepWork:
        running = engine.scheduler.running
        assert not engine.scheduler.waiting and all(s.num_computed_tokens == s.num_tokens - 1 for s in running)
        return StepWork(0, 0, len(running), sum(s.num_computed_tokens + 1 for s in running))

    compute_eff: dict[int, float] = {}
    lengths = [32, 128, 256] if quick else [16, 64, 128, 256, 512]
    for length in sorted({min(n, engine.max_model_len - 4) for n in lengths}):
        runs = []
        for _ in range(repeats):
            request_id = f"p{next(counter)}"
            engine.add_request(request_id, fresh_prompt(length), SamplingParams(max_tokens=2, temperature=0.0,
                                                                                ignore_eos=True))
            runs.append(timed_step())
            engine.abort(request_id)
        seconds = statistics.median(runs)
        work = StepWork(length, StepWork.chunk_pairs(0, length))
        samples.append((work, seconds))
        flops = 2 * shape.params_total_b * 1e9 * length + 4 * shape.layers * shape.num_attention_heads * \
            shape.head_dim * work.prefill_pairs
        compute_eff[length] = flops / seconds / peak_flops
        log(f"[profile] prefill {length:5d} tokens: {1000 * seconds:7.1f} ms, {compute_eff[length]:.2f} of peak compute")

    memory_eff: dict[int, float] = {}
    kv_per_token = shape.kv_elements_per_token() * 4
    contexts = [64] if quick else [64, 320]
    mixed_chunk = 64 if quick else 128
    for context in contexts:
        # Every batch size at the longer context: a matmul library's kernel choice makes some
        # sizes slower than larger ones (the model's decode_batch_factor).
        for batch in ([1, 2, 4] if quick else range(1, 17) if context == contexts[-1] else [1, 2, 4, 8, 16]):
            # One shared prompt: the first request computes it, the rest reuse it from the prefix cache.
            prompt = fresh_prompt(context)
            ids = [f"d{next(counter)}" for _ in range(batch)]
            for index, request_id in enumerate(ids):
                engine.add_request(request_id, prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
                while engine.scheduler.waiting or len(engine.progress(request_id)[0]) == 0:
                    engine.step()
                if index == 0:
                    engine.step()  # the others catch up one token; contexts stay within a block
            # The first step of a batch size builds its kernels (oneDNN keeps one per shape): a cost
            # served workers pay once, not per step. Untimed.
            engine.step()
            times = []
            for _ in range(repeats):
                work = decoding_work()
                times.append(timed_step())
                samples.append((work, times[-1]))
            seconds = statistics.median(times)
            moved = weights + batch * context * kv_per_token
            memory_eff.setdefault(batch, moved / seconds / peak_bw)
            log(f"[profile] decode batch {batch:3d} at context {context:4d}: {1000 * seconds:7.1f} ms/step")
            if batch in (1, 4, 16):  # a prompt chunk beside the decodes: a colocated engine's step
                for warm in (True, False):  # the first such step builds its kernels (above): untimed
                    decode = decoding_work()
                    extra = f"m{next(counter)}"
                    engine.add_request(extra, fresh_prompt(mixed_chunk),
                                       SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
                    work = StepWork(mixed_chunk, StepWork.chunk_pairs(0, mixed_chunk), decode.decode_seqs,
                                    decode.decode_context)
                    seconds = timed_step()
                    engine.abort(extra)
                    if not warm:
                        samples.append((work, seconds))
                log(f"[profile] mixed: {mixed_chunk} prompt tokens + {batch} decodes: {1000 * seconds:7.1f} ms")
            for request_id in ids:
                engine.abort(request_id)

    links: tuple[dict[str, Any], ...] = ()
    if transports:
        from hetpd.plan.transport_profile import measure_links

        links = tuple(m.as_catalog_entry() for m in measure_links(quick, log))
    fit = fit_steps_by_batch(samples)
    log(f"[profile] step model fitted to {len(samples)} steps: median error {100 * fit.median_error:.1f}%, "
        f"worst {100 * fit.worst_error:.1f}%")
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    accelerator = {"id": "local", "name": f"this machine ({os.cpu_count()} CPUs, torch {dtype})", "vendor": "local",
                   "peak_tflops": {"fp32" if dtype == "float32" else "bf16": peak_flops / 1e12},
                   "memory_gb": pages / 1e9, "memory_tbps": peak_bw / 1e12, "confidence": "high",
                   "sources": ["measured by hetpd profile"]}
    measured_steps = [{"work": [w.prefill_tokens, w.prefill_pairs, w.decode_seqs, w.decode_context], "seconds": t}
                      for w, t in samples]
    return Calibration(statistics.median(compute_eff.values()), statistics.median(memory_eff.values()), accelerator,
                       {"prefill_compute_efficiency": compute_eff, "decode_memory_efficiency": memory_eff,
                        "peak_tflops": peak_flops / 1e12, "copy_gbps": peak_bw / 1e9, "steps": measured_steps},
                       fit.model, fit.median_error, torch.get_num_threads(), links, neighbours,
                       tuple(shape_of(shape).items()), "fp32" if dtype == "float32" else "bf16")


def load_steps(path: str) -> MeasuredSteps:
    """The step model a ``hetpd profile`` calibration file holds."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return MeasuredSteps.from_dict((raw.get("step_model") or {}).get("terms"), f"{path}: step_model.terms")


def write(calibration: Calibration, path: Path) -> None:
    body = {"accelerators": [calibration.accelerator], "links": list(calibration.links),
            "efficiency": {"compute": calibration.compute, "memory": calibration.memory},
            "step_model": {"threads": calibration.threads, "neighbours": calibration.neighbours,
                           "median_error": calibration.step_fit_error,
                           "model": dict(calibration.model_shape), "format": calibration.compute_fmt,
                           "terms": calibration.steps.as_dict()},
            "measurements": calibration.measurements}
    path.write_text("# hetpd profile: this machine's peaks and the engine's achieved fractions of them\n"
                    + yaml.safe_dump(body, sort_keys=False))


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="hetpd profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--neighbours", type=int, default=0,
                   help="other workers that will share this host (1P1D on one machine: 1); as many busy engines run "
                        "beside the measurements")
    p.add_argument("--no-transports", action="store_true", help="skip measuring the local KV transports")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, as the worker you calibrate for runs (serve gives each worker CPUs/workers)")
    p.add_argument("--out", type=Path, default=Path("calibration.yaml"))
    p.add_argument("--served-steps", type=Path, default=None, metavar="DIR",
                   help="also fit the step model to the steps a deployment served (`hetpd serve --step-trace DIR`)")
    p.add_argument("--workers", default="", help="with --served-steps: only workers whose id starts with this "
                                                 "(a pool's name, e.g. decode)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="with --served-steps: refit this calibration file instead of profiling again")
    args = p.parse_args(argv)
    from hetpd.plan.served_steps import refit, served_steps

    if args.calibration is not None:
        if args.served_steps is None:
            p.error("--calibration refits a calibration file: give --served-steps DIR too")
        refitted = refit(args.calibration, served_steps(args.served_steps, args.workers), args.out)
        print(f"{refitted.summary()}; wrote {args.out}")
        return 0
    calibration = profile(args.model, args.dtype, args.quick, args.threads, not args.no_transports, args.neighbours)
    write(calibration, args.out)
    if args.served_steps is not None:
        refit(args.out, served_steps(args.served_steps, args.workers), args.out)
    print(f"compute efficiency {calibration.compute:.2f}, memory efficiency {calibration.memory:.2f}, step model "
          f"within {100 * calibration.step_fit_error:.0f}% (median); wrote {args.out}")
    return 0
