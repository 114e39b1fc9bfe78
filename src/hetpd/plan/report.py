"""Pictures of a plan: the accelerator-stage matching plot, the Pareto frontier, the TTFT
distributions and utilisation of the top placements, and the coupling heat map, in one PNG + HTML.

The matching plot puts each accelerator of the fleet at (memory bandwidth, peak compute) in the
chosen format; each stage of the scenario's workload is a line of constant arithmetic
intensity (FLOPs per byte moved). An accelerator above a stage's line has compute to spare for
that stage (it is bandwidth-bound there); below it, compute binds.
"""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path
from typing import Any

from hetpd.bench.workload import RequestSpec
from hetpd.plan.cost import kv_bytes_per_token, weight_bytes
from hetpd.plan.search import PlanResult
from hetpd.plan.spec import FORMAT_BYTES, Accelerator, ModelShape


def stage_intensity(model: ModelShape, requests: list[RequestSpec], weight_fmt: str, kv_fmt: str,
                    decode_batch: int) -> dict[str, float]:
    """FLOPs per byte of each stage: prefill reads the weights once for a whole prompt; a decode
    step reads them (and every sequence's KV) for one token per sequence."""
    prompt = statistics.fmean(r.input_tokens for r in requests)
    context = statistics.fmean(r.input_tokens + r.output_tokens / 2 for r in requests)
    flops_per_token = 2 * model.params_active_b * 1e9
    prefill = flops_per_token * prompt / weight_bytes(model, weight_fmt)
    decode = flops_per_token * decode_batch / (weight_bytes(model, weight_fmt, active=True)
                                               + decode_batch * context * kv_bytes_per_token(model, kv_fmt))
    return {"prefill": prefill, f"decode (batch {decode_batch})": decode}


def draw(result: PlanResult, fleet: list[Accelerator], model: ModelShape, requests: list[RequestSpec],
         coupling: dict[str, dict[str, float]] | None, out: Path, fmt: str = "bf16") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(27, 5))
    ax = axes[0]
    for acc in fleet:
        ax.scatter(acc.memory_tbps, acc.flops(fmt) / 1e12, s=60)
        ax.annotate(acc.name, (acc.memory_tbps, acc.flops(fmt) / 1e12), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    xs = [min(a.memory_tbps for a in fleet) / 2, max(a.memory_tbps for a in fleet) * 2]
    for stage, intensity in stage_intensity(model, requests, fmt, fmt, 32).items():
        ax.plot(xs, [x * intensity for x in xs], "--", label=f"{stage}: {intensity:.0f} FLOP/B")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory bandwidth (TB/s)")
    ax.set_ylabel(f"peak {fmt} TFLOP/s")
    ax.set_title("accelerator-stage matching")
    ax.legend(fontsize=7)

    ax = axes[1]
    ax.scatter([e.accelerators for e in result.ranked], [e.goodput for e in result.ranked], s=8, alpha=0.4,
               label="candidates")
    ax.plot([e.accelerators for e in result.pareto], [e.goodput for e in result.pareto], "o-", color="C3",
            label="Pareto frontier")
    ax.set_xlabel("accelerators used")
    ax.set_ylabel("goodput (req/s within SLO)")
    ax.set_title("goodput against accelerators")
    ax.legend(fontsize=7)

    ax = axes[2]
    for e in result.ranked[:3]:
        if e.result is None:
            continue
        ttfts = sorted(1000 * t.ttft for t in e.result.requests if t.ttft is not None)
        ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=e.candidate.describe()[:60])
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT of the top placements")
    ax.legend(fontsize=6)

    ax = axes[3]
    top = [e for e in result.ranked[:3] if e.result is not None]
    for k, e in enumerate(top):
        r = e.result
        assert r is not None
        values = [r.prefill_utilisation, r.decode_utilisation, r.link_utilisation]
        ax.bar([i + 0.25 * k for i in range(3)], values, width=0.25, label=e.candidate.describe()[:50])
    ax.set_xticks([0.25, 1.25, 2.25], ["prefill", "decode", "link"])
    ax.set_ylabel("busy fraction")
    ax.set_title("utilisation of the top placements")
    if top:
        ax.legend(fontsize=6)

    ax = axes[4]
    if coupling:
        names = list(coupling)
        grid = [[coupling[a][b] for b in names] for a in names]
        extent = max(1e-9, max(abs(v) for row in grid for v in row))  # a symmetric scale: white is "no coupling"
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-extent, vmax=extent)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("coupling (joint gain - single gains)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / "plan.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_html(png: Path, searched: str, table: str, explained: list[dict[str, Any]], out: Path) -> Path:
    image = base64.b64encode(png.read_bytes()).decode()

    def line(e: dict[str, Any]) -> str:
        gains = ", ".join(f"{html.escape(axis)} +{100 * g:.0f}%"
                          for axis, g in sorted(e["gains"].items(), key=lambda kv: -kv[1]))
        return f"<li>{html.escape(e['candidate'])}: <b>{html.escape(e['binding'])}</b> (doubled: {gains})</li>"

    page = (f"<!doctype html><meta charset='utf-8'><title>hetpd plan</title><h1>hetpd plan</h1>"
            f"<p>{html.escape(searched)}</p><pre>{html.escape(table)}</pre>"
            f"<h2>What binds</h2><ul>{''.join(line(e) for e in explained)}</ul>"
            f"<img src='data:image/png;base64,{image}' style='max-width:100%'>")
    path = out / "plan.html"
    path.write_text(page)
    return path
