#!/usr/bin/env python
"""Serving benchmark: the default 1P1D deployment against a colocated one, replayed with `hetpd bench`.

Starts each deployment with `hetpd serve` (real processes), sweeps Poisson request rates with
`hetpd bench`, stops it, then draws the side-by-side report. The deployments share the model
(SmolLM2-135M-Instruct) and the decode precision (bf16 weights, int8 KV); the disaggregated one
prefills in fp32 and hands the KV over shared memory.

    .venv/bin/python benchmarks/serving.py [--rates 1,2,4] [--num-requests 24]

Writes benchmarks/results/serving/{disaggregated,colocated}.json and report/{report.png,report.html}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from hetpd.models.default_model import default_model_dir
from hetpd.serve.local import local_server

OUT = Path(__file__).parent / "results" / "serving"
DEPLOYMENTS = {
    "disaggregated": [
        {"name": "prefill", "role": "prefill", "dtype": "float32", "kv_cache_dtype": "float32", "num_kv_blocks": 512},
        {"name": "decode", "role": "decode", "dtype": "bfloat16", "kv_cache_dtype": "int8", "num_kv_blocks": 1024},
    ],
    "colocated": [
        {"name": "colocated", "role": "colocated", "dtype": "bfloat16", "kv_cache_dtype": "int8", "num_kv_blocks": 1024},
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1,2,4")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model = default_model_dir()
    results = []
    for name, pools in DEPLOYMENTS.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        config = OUT / f"{name}.deploy.yaml"
        config.write_text(yaml.safe_dump({"model": str(model), "served_model_name": "smollm2", "pools": pools}))
        with local_server(config, OUT / f"{name}.serve.log") as server:
            result = OUT / f"{name}.json"
            subprocess.run([sys.executable, "-m", "hetpd.cli", "bench", "--url", server.url, "--model", "smollm2",
                            "--rates", args.rates, "--num-requests", str(args.num_requests), "--input-range",
                            f"{args.input_len // 2},{args.input_len}", "--output-len", str(args.output_len),
                            "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100", "--name", name, "--out", str(result)],
                           check=True)
            results.append(result)
    subprocess.run([sys.executable, "-m", "hetpd.cli", "bench", "report", *map(str, results), "--out",
                    str(OUT / "report")], check=True)


if __name__ == "__main__":
    main()
