#!/usr/bin/env python
"""Regenerate hetpd's built-in catalog (src/hetpd/plan/catalog/*.yaml) from the research catalog.

The research files (../shared/catalog, with long notes and per-field confidence) are the
evidence; hetpd ships a normalised subset: the numbers the planner uses, each entry with its
confidence flag and source URLs. Run from the repository root:

    .venv/bin/python tools/import_catalog.py ../shared/catalog
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "hetpd" / "plan" / "catalog"
# Per-transfer overhead priors (us) by link family, from the research catalog's modelling guidance
# (1-5 us per RDMA work request; kernel TCP tens of us; GPU P2P copies 2-3 us, launch dominated).
OVERHEAD_US = {"scale_up": 3.0, "host": 5.0, "rdma": 2.0, "tcp": 30.0}
EFFICIENCY = {"scale_up": 0.83, "host": 0.8, "rdma": 0.87, "tcp": 0.3}


def urls(entry: dict[str, Any]) -> list[str]:
    return [s["url"] for s in entry.get("sources") or [] if isinstance(s, dict) and s.get("url")]


def first_number(text: object) -> float | None:
    if isinstance(text, (int, float)):
        return float(text)
    match = re.search(r"\d+(\.\d+)?", str(text or ""))
    return float(match.group()) if match else None


def accelerators(raw: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in raw["accelerators"]:
        peak = {fmt: e.get(key) for fmt, key in (("fp32", "fp32_tflops"), ("bf16", "bf16_dense_tflops"),
                                                  ("fp16", "fp16_dense_tflops"), ("fp8", "fp8_dense_tflops"),
                                                  ("int8", "int8_dense_tops"), ("int4", "int4_dense_tops"),
                                                  ("fp4", "fp4_dense_tflops"))}
        out.append({
            "id": e["id"], "name": e["name"], "vendor": e["vendor"],
            "peak_tflops": {k: float(v) for k, v in peak.items() if isinstance(v, (int, float))},
            "memory_gb": e.get("hbm_gb"), "memory_tbps": e.get("hbm_tbps"),
            "scaleup_unidir_gbps": e.get("scaleup_unidir_gbps"), "host_link": e.get("host_link"),
            "tdp_w": e.get("tdp_w"), "native_formats": list(e.get("native_matmul_formats") or []),
            "price_per_hour": None, "confidence": e.get("confidence", "low"), "sources": urls(e),
        })
    return out


def family(entry: dict[str, Any]) -> str:
    ident = entry["id"]
    if ident.startswith("tcp"):
        return "tcp"
    if ident.startswith(("ib_", "roce", "gaudi3")):
        return "rdma"
    if ident.startswith(("pcie", "cxl")):
        return "host"
    return "scale_up"


def links(raw: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in raw["interconnects"]:
        peak = e.get("peak_unidir_gbps")
        if not isinstance(peak, (int, float)):
            continue
        kind = family(e)
        efficiency = e.get("efficiency")
        if not isinstance(efficiency, (int, float)):
            achieved = e.get("achieved_unidir_gbps")
            efficiency = achieved / peak if isinstance(achieved, (int, float)) else EFFICIENCY[kind]
        out.append({
            "id": e["id"], "name": e["name"], "family": kind, "peak_unidir_gbps": float(peak),
            "efficiency": round(float(efficiency), 3), "latency_us": first_number(e.get("latency_us")) or OVERHEAD_US[kind],
            "per_transfer_overhead_us": OVERHEAD_US[kind], "confidence": e.get("confidence", "low"), "sources": urls(e),
        })
    return out


def models(raw: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size",
            "vocab_size", "params_total_b", "params_active_b", "kv_lora_rank", "qk_rope_head_dim", "num_experts",
            "experts_per_token")
    for e in raw["models"]:
        e.setdefault("num_experts", e.get("n_routed_experts"))
    return [{"id": e["id"], "hf_repo": e.get("hf_repo"), **{k: e[k] for k in keys if e.get(k) is not None},
             "confidence": e.get("confidence", "high"), "sources": [f"https://huggingface.co/{e['hf_repo']}"]}
            for e in raw["models"]]


# The cost model's short format names, and the research entry each stands for.
PLANNER_FORMATS = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8_e4m3_per_tensor", "int8": "int8_w8a8",
                   "int4": "int4_w4a16_awq_g128", "fp4": "nvfp4"}


def formats(raw: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[str, list[str]] = raw.get("hardware_groups") or {}
    planner = {v: k for k, v in PLANNER_FORMATS.items()}

    def expand(names: list[str]) -> list[str]:
        return sorted({acc for name in names for acc in groups.get(name, [name])})

    def bits(value: Any) -> float:  # a mixed format (W4A8...) gives per-operand bits: take the weights'
        if isinstance(value, dict):
            value = value.get("weights", next(iter(value.values())))
        number = first_number(value)
        if number is None:
            raise ValueError(f"no bit count in {value!r}")
        return number

    return [{"id": e["id"], "name": e.get("name", e["id"]), "planner_name": planner.get(e["id"]),
             "used_for": list(e.get("used_for") or []), "element_bits": bits(e["element_bits"]),
             "effective_bits": bits(e.get("bits_per_element_effective") or e["element_bits"]),
             "native_on": expand(list(e.get("native_matmul_hw") or [])),
             "confidence": e.get("confidence", "medium"), "sources": urls(e)}
            for e in raw["precisions"] if e.get("element_bits") is not None]


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/catalog")
    header = "# Generated by tools/import_catalog.py from the research catalog; edit there, or add your own YAML.\n"
    for name, build, key in (("accelerators", accelerators, "accelerators"), ("links", links, "interconnects"),
                             ("models", models, "models"), ("formats", formats, "precisions")):
        raw = yaml.safe_load((src / f"{key}.yaml").read_text())
        (OUT / f"{name}.yaml").write_text(header + yaml.safe_dump({name: build(raw)}, sort_keys=False, width=120))
        print(f"wrote {OUT / name}.yaml")


if __name__ == "__main__":
    main()
