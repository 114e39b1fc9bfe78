"""Cost of KV representation conversions, in GB/s of producer bytes (one section of kv_transfer.py).

Each conversion runs through bytes the way a handoff does: unpack the producer's payload,
convert, pack the consumer's. The raw path measured beside it is a plain copy of the same
producer bytes, so the ratio says how many memory copies one conversion costs.

Run alone: ``python benchmarks/kv_conversion.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from hetpd.kv.convert import convert_payload
from hetpd.kv.encodings import format_for
from hetpd.kv.format import KVFormat, ModelFingerprint
from hetpd.kv.layout import codec_of, pack

# SmolLM2-135M's KV shape; tokens chosen so the fp32 payload is ~64 MiB (~16 MiB with --quick).
MODEL = ModelFingerprint("LlamaForCausalLM", 30, 3, 64, "default", "bench", "bench")

CONVERSIONS: list[tuple[str, str, dict[str, object]]] = [
    ("fp32", "bf16", {}),
    ("fp32", "int8-token-f32", {}),
    ("fp32", "fp8-tensor-f32", {}),
    ("bf16", "int4-g16z-f16", {}),
    ("int8-token-f32", "fp32", {}),
    ("fp8-token-f32", "bf16", {}),
    ("int4-g16z-f16", "bf16", {}),
    ("bf16", "bf16", {"layout": "HND"}),  # relayout only
    ("bf16", "bf16", {"page_size": 32}),  # re-page only
]


@dataclass(frozen=True)
class ConversionResult:
    source: str
    target: str
    source_bytes: int
    convert_gbps: float
    copy_gbps: float

    @property
    def copies(self) -> float:
        """How many plain copies of the source bytes one conversion costs."""
        return self.copy_gbps / self.convert_gbps


def measure(repeats: int, quick: bool) -> list[ConversionResult]:
    tokens = 3000 if quick else 12000
    results = []
    for source_name, target_name, changes in CONVERSIONS:
        source: KVFormat = format_for(MODEL, source_name)
        target: KVFormat = format_for(MODEL, target_name, **changes)
        values = torch.randn(MODEL.num_layers, 2, tokens, MODEL.num_kv_heads, MODEL.head_dim)
        payload = pack(codec_of(source).encode(values), source)
        destination = bytearray(len(payload))
        convert_times, copy_times = [], []
        for _ in range(repeats):  # interleaved: the machine is shared and drifts
            start = time.perf_counter()
            destination[:] = payload
            copy_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            convert_payload(payload, source, target, tokens)
            convert_times.append(time.perf_counter() - start)
        label = target_name + "".join(f" {k}={v}" for k, v in changes.items())
        result = ConversionResult(source_name, label, len(payload), len(payload) / statistics.median(convert_times) / 1e9,
                                  len(payload) / statistics.median(copy_times) / 1e9)
        print(f"  {source_name:>16} -> {label:<22} {result.convert_gbps:6.2f} GB/s "
              f"({result.copies:5.1f} copies)", file=sys.stderr)
        results.append(result)
    return results


def table(results: list[ConversionResult]) -> str:
    lines = [f"{'conversion':44s} {'MB in':>7s} {'GB/s':>6s} {'copy GB/s':>9s} {'copies':>7s}"]
    for r in results:
        lines.append(f"{r.source + ' -> ' + r.target:44s} {r.source_bytes / 1e6:7.1f} {r.convert_gbps:6.2f} "
                     f"{r.copy_gbps:9.2f} {r.copies:7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(table(measure(args.repeats, args.quick)))


if __name__ == "__main__":
    main()
