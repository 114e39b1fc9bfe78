"""``hetpd plan --emit-deploy``: the deployment file ``hetpd serve`` runs for a chosen placement.

hetpd's engine runs fp32/bf16 weights (int8 weight-only as an option) and fp32, bf16, fp16,
int8 or fp8 KV. A placement that asks for more (fp8 weights, say) is emitted with the nearest
format hetpd runs, and the note says so: the file is runnable as is, never silently different.
"""

from __future__ import annotations

from typing import Any

from hetpd.plan.search import Candidate
from hetpd.plan.spec import Catalog

_WEIGHTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "fp16": ("bfloat16", None),
            "int8": ("bfloat16", "int8"), "fp8": ("bfloat16", None), "int4": ("bfloat16", "int8"),
            "fp4": ("bfloat16", "int8")}
# The planner's KV format names the engine runs exactly, as engine kv_cache_dtype names.
ENGINE_KV_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "fp8_e4m3", "int8": "int8"}
_KV = {**ENGINE_KV_DTYPE, "int4": "int8"}


def deployment_for(candidate: Candidate, catalog: Catalog, link: str, model_path: str | None = None,
                   page_size: int = 16) -> tuple[dict[str, Any], list[str]]:
    """A deployment file (as a dict) for ``candidate``, and notes on every approximation made."""
    notes: list[str] = []
    family = catalog.link(link).family
    transport = "shm" if family in ("scale_up", "host") else "tcp"

    def pool(name: str, role: str, count: int, tp: int, accelerator: str, weights: str, kv: str) -> dict[str, Any]:
        acc = catalog.accelerator(accelerator)
        dtype, quantization = _WEIGHTS[weights]
        if weights in ("fp8", "fp16", "int4", "fp4"):
            notes.append(f"{name}: {weights} weights are not run by hetpd's engine; emitted as {dtype}"
                         + (f" with {quantization} weight-only quantization" if quantization else ""))
        if kv == "int4":
            notes.append(f"{name}: int4 KV at rest is not run by hetpd's engine; emitted as int8")
        if tp > 1:
            notes.append(f"{name}: tensor parallel {tp} is not run by hetpd's engine yet; emitted as {count} single "
                         "workers")
        device = "cuda" if acc.vendor == "NVIDIA" else "cpu"
        if device == "cpu":
            notes.append(f"{name}: hetpd has no {acc.vendor} backend; emitted with device cpu")
        return {"name": name, "role": role, "count": count, "device": device, "dtype": dtype,
                "quantization": quantization, "kv_cache_dtype": _KV[kv], "block_size": page_size,
                "transport": transport}

    c = candidate
    deploy = {"model": model_path, "pools": [
        pool("prefill", "prefill", c.prefill_count, c.prefill_tp, c.prefill, c.prefill_weights, "bf16"),
        pool("decode", "decode", c.decode_count, c.decode_tp, c.decode, c.decode_weights, c.kv_format),
    ]}
    return deploy, notes
