"""``hetpd profile``: measure this machine and the local engine; write a calibration file.

The planner's cost model needs two efficiency factors per device (achieved fraction of peak
compute, and of peak memory bandwidth). This measures the machine's peaks (a large matmul, a
large copy), then the engine's prefill at several prompt lengths and its decode step at several
batch sizes, and reports each as a fraction of the peak. The file it writes is a catalog file
(an accelerator entry for this machine) plus the measured efficiencies, which a scenario names
under ``calibration:``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Calibration:
    compute: float
    memory: float
    accelerator: dict[str, Any]
    measurements: dict[str, Any]


def _best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def profile(model_dir: Path | None, dtype: str = "float32", quick: bool = False,
            log: Any = lambda m: print(m, file=sys.stderr, flush=True)) -> Calibration:
    import torch

    from hetpd.engine.config import EngineConfig
    from hetpd.engine.engine import Engine
    from hetpd.plan.cost import attention_flops
    from hetpd.plan.spec import ModelShape
    from hetpd.sampling_params import SamplingParams

    repeats = 3
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    size = 2048  # large enough to reach the matmul peak on small machines too
    a, b = torch.randn(size, size, dtype=torch_dtype), torch.randn(size, size, dtype=torch_dtype)
    peak_flops = 2 * size**3 / _best(lambda: torch.mm(a, b), repeats)
    n = (64 if quick else 256) * (1 << 20) // 4
    src, dst = torch.randn(n), torch.empty(n)
    peak_bw = 2 * 4 * n / _best(lambda: dst.copy_(src), repeats)
    log(f"[profile] machine: {peak_flops / 1e12:.3f} TFLOP/s ({dtype} matmul), {peak_bw / 1e9:.1f} GB/s (copy)")

    engine = Engine.from_config(EngineConfig(model=None if model_dir is None else str(model_dir), dtype=dtype))
    config = engine.model_config
    shape = ModelShape.from_config(config, "local")
    weights = shape.params_total_b * 1e9 * (4 if dtype == "float32" else 2)
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    counter = iter(range(10**9))

    def prefill(length: int) -> float:
        run = next(counter)
        request_id = f"p{run}"
        # A different prompt each run: the prefix cache must not serve it.
        engine.add_request(request_id, [5 + ((i * 7 + run * 13) % (config.vocab_size - 10)) for i in range(length)],
                           greedy)
        start = time.perf_counter()
        while not engine.progress(request_id)[0]:  # chunked prefill: every chunk until the first token
            engine.step()
        elapsed = time.perf_counter() - start
        engine.abort(request_id)
        return elapsed

    compute_eff: dict[int, float] = {}
    # Long enough prompts to be compute-bound (short ones only measure weight reads).
    lengths = sorted({min(n, engine.max_model_len - 4) for n in ([256, 512] if quick else [512, 1024, 2048])})
    for length in lengths:
        seconds = min(prefill(length) for _ in range(repeats))
        flops = 2 * shape.params_total_b * 1e9 * length + attention_flops(shape, length, (length + 1) // 2)
        compute_eff[length] = flops / seconds / peak_flops
        log(f"[profile] prefill {length:5d} tokens: {1000 * seconds:7.1f} ms, {compute_eff[length]:.2f} of peak compute")

    memory_eff: dict[int, float] = {}
    context = 64 if quick else 256
    kv_per_token = shape.kv_elements_per_token() * 4
    for batch in ([1, 4] if quick else [1, 4, 16]):
        ids = [f"d{next(counter)}" for _ in range(batch)]
        for request_id in ids:
            engine.add_request(request_id, [7] * context, SamplingParams(max_tokens=64, temperature=0.0,
                                                                          ignore_eos=True))
        while any(len(engine.progress(i)[0]) == 0 for i in ids):  # prefill them all first
            engine.step()
        steps = [0.0] * repeats
        for r in range(repeats):
            start = time.perf_counter()
            engine.step()
            steps[r] = time.perf_counter() - start
        for request_id in ids:
            engine.abort(request_id)
        seconds = min(steps)
        moved = weights + batch * context * kv_per_token
        memory_eff[batch] = moved / seconds / peak_bw
        log(f"[profile] decode batch {batch:3d}: {1000 * seconds:7.1f} ms/step, {memory_eff[batch]:.2f} of peak bandwidth")

    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    accelerator = {"id": "local", "name": f"this machine ({os.cpu_count()} CPUs, torch {dtype})", "vendor": "local",
                   "peak_tflops": {"fp32" if dtype == "float32" else "bf16": peak_flops / 1e12},
                   "memory_gb": pages / 1e9, "memory_tbps": peak_bw / 1e12, "confidence": "high",
                   "sources": ["measured by hetpd profile"]}
    return Calibration(statistics.median(compute_eff.values()), statistics.median(memory_eff.values()), accelerator,
                       {"prefill_compute_efficiency": compute_eff, "decode_memory_efficiency": memory_eff,
                        "peak_tflops": peak_flops / 1e12, "copy_gbps": peak_bw / 1e9})


def write(calibration: Calibration, path: Path) -> None:
    body = {"accelerators": [calibration.accelerator],
            "efficiency": {"compute": calibration.compute, "memory": calibration.memory},
            "measurements": calibration.measurements}
    path.write_text("# hetpd profile: this machine's peaks and the engine's achieved fractions of them\n"
                    + yaml.safe_dump(body, sort_keys=False))


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="hetpd profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("calibration.yaml"))
    args = p.parse_args(argv)
    calibration = profile(args.model, args.dtype, args.quick)
    write(calibration, args.out)
    print(f"compute efficiency {calibration.compute:.2f}, memory efficiency {calibration.memory:.2f}; wrote {args.out}")
    return 0
