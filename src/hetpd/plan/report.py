"""Pictures of a plan, in one PNG + HTML: the accelerator-stage matching plot, the Pareto
frontier (with the goodput bounds of the pruned placements), the utilisation of the top
placements, the coupling heat map, their TTFT, TPOT and end-to-end latency distributions
(CDFs), and how close the search's goodput bound came to the simulated goodput.

The matching plot puts each accelerator of the fleet at (memory bandwidth, peak compute) in the
chosen format; each stage of the scenario's workload is a line of constant arithmetic
intensity (FLOPs per byte moved). An accelerator above a stage's line has compute to spare for
that stage (it is bandwidth-bound there); below it, compute binds.
"""

from __future__ import annotations

import base64
import html
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetpd.bench.workload import RequestSpec
from hetpd.plan.cost import kv_bytes_per_token, weight_bytes
from hetpd.plan.explain import gains_text
from hetpd.plan.search import PlanResult
from hetpd.plan.simulator import RequestTimes
from hetpd.plan.spec import Accelerator, CatalogError, ModelShape


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


def peak_in(acc: Accelerator, fmt: str) -> tuple[str, float]:
    """The accelerator's peak TFLOP/s in ``fmt``, or, where the catalog has no figure for it (nor a
    16-bit one to run it in), its highest listed figure, with that figure's format."""
    try:
        return fmt, acc.flops(fmt) / 1e12
    except CatalogError:
        listed = max(acc.peak_tflops, key=acc.peak_tflops.__getitem__)
        return listed, acc.peak_tflops[listed]


LATENCIES: dict[str, Callable[[RequestTimes], float | None]] = {
    "TTFT": lambda t: t.ttft,
    "TPOT": lambda t: t.tpot,
    "end-to-end latency": lambda t: None if t.finished is None else t.finished - t.arrival,
}


def latency_cdf(requests: tuple[RequestTimes, ...], latency: Callable[[RequestTimes], float | None]
                ) -> tuple[list[float], list[float]]:
    """Sorted latencies in ms and the fraction of requests at or below each (those that have one)."""
    values = sorted(1000 * v for v in map(latency, requests) if v is not None)
    return values, [(i + 1) / len(values) for i in range(len(values))]


def draw(result: PlanResult, fleet: list[Accelerator], model: ModelShape, requests: list[RequestSpec],
         coupling: dict[str, dict[str, float]] | None, out: Path, fmt: str = "bf16", top: int = 3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 4, figsize=(26, 10))
    ax = grid[0][0]
    for acc in fleet:
        shown, tflops = peak_in(acc, fmt)
        ax.scatter(acc.memory_tbps, tflops, s=60)
        name = acc.name if acc.name.isascii() else acc.id  # the plot's font has no CJK glyphs
        ax.annotate(name if shown == fmt else f"{name} ({shown}: no {fmt} figure)", (acc.memory_tbps, tflops),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    xs = [min(a.memory_tbps for a in fleet) / 2, max(a.memory_tbps for a in fleet) * 2]
    for stage, intensity in stage_intensity(model, requests, fmt, fmt, 32).items():
        ax.plot(xs, [x * intensity for x in xs], "--", label=f"{stage}: {intensity:.0f} FLOP/B")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory bandwidth (TB/s)")
    ax.set_ylabel(f"peak {fmt} TFLOP/s")
    ax.set_title("accelerator-stage matching")
    ax.legend(fontsize=7)

    ax = grid[0][1]
    if result.pruned:
        ax.scatter([x.accelerators for x in result.pruned], [x.bound for x in result.pruned], s=8, marker="x",
                   color="0.7", alpha=0.5, label="pruned: goodput bound")
    ax.scatter([e.accelerators for e in result.ranked], [e.goodput for e in result.ranked], s=8, alpha=0.4,
               label="simulated")
    ax.plot([e.accelerators for e in result.pareto], [e.goodput for e in result.pareto], "o-", color="C3",
            label="Pareto frontier")
    ax.set_xlabel("accelerators used")
    ax.set_ylabel("goodput (req/s within SLO)")
    ax.set_title("goodput against accelerators")
    ax.legend(fontsize=7)

    best = [e for e in result.ranked[:top] if e.result is not None]
    ax = grid[0][2]
    for k, e in enumerate(best):
        r = e.result
        assert r is not None
        values = [r.prefill_utilisation, r.decode_utilisation, r.link_utilisation]
        ax.bar([i + 0.25 * k for i in range(3)], values, width=0.25, label=f"#{k + 1} {e.candidate.describe()}")
    ax.set_xticks([0.25, 1.25, 2.25], ["prefill", "decode", "link"])
    ax.set_ylabel("busy fraction")
    ax.set_title("utilisation of the top placements")
    if best:
        ax.legend(fontsize=5)

    ax = grid[0][3]
    if coupling:
        names = list(coupling)
        cells = [[coupling[a][b] for b in names] for a in names]
        extent = max(1e-9, max(abs(v) for row in cells for v in row))  # a symmetric scale: white is "no coupling"
        image = ax.imshow(cells, cmap="RdBu_r", vmin=-extent, vmax=extent)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("coupling (joint gain - single gains)")

    for ax, (name, latency) in zip(grid[1][:3], LATENCIES.items(), strict=True):
        for k, e in enumerate(best):
            assert e.result is not None
            xs_ms, fractions = latency_cdf(e.result.requests, latency)
            ax.plot(xs_ms, fractions, label=f"#{k + 1} {e.candidate.describe()}")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} of the top placements")
        if best:
            ax.legend(fontsize=5)

    ax = grid[1][3]
    bounded = [e for e in result.ranked if e.bound is not None and e.bound < float("inf")]
    if bounded:
        ax.scatter([e.goodput for e in bounded], [e.bound or 0.0 for e in bounded], s=8, alpha=0.5)
        top_value = max(max(e.bound or 0.0 for e in bounded), 1e-9)
        ax.plot([0, top_value], [0, top_value], "--", color="0.5", label="bound = simulated")
        ax.legend(fontsize=7)
    ax.set_xlabel("simulated goodput (req/s)")
    ax.set_ylabel("goodput bound (req/s)")
    ax.set_title(f"search: {result.simulated} simulated, {len(result.pruned)} pruned")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / "plan.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_html(png: Path, searched: str, table: str, explained: list[dict[str, Any]], out: Path) -> Path:
    image = base64.b64encode(png.read_bytes()).decode()

    def line(e: dict[str, Any]) -> str:
        gains = html.escape(gains_text(e["gains"]))
        return f"<li>{html.escape(e['candidate'])}: <b>{html.escape(e['binding'])}</b> (doubled: {gains})</li>"

    page = (f"<!doctype html><meta charset='utf-8'><title>hetpd plan</title><h1>hetpd plan</h1>"
            f"<p>{html.escape(searched)}</p><pre>{html.escape(table)}</pre>"
            f"<h2>What binds</h2><ul>{''.join(line(e) for e in explained)}</ul>"
            f"<img src='data:image/png;base64,{image}' style='max-width:100%'>")
    path = out / "plan.html"
    path.write_text(page)
    return path
