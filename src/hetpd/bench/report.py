"""Result files and reports: save a run as JSON; compare runs side by side with plots.

``hetpd bench report A.json B.json --out DIR`` writes ``report.png`` (latency CDFs; throughput
and goodput against request rate for sweeps) and ``report.html`` (the table and the plot).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hetpd.bench.runner import RunResult

FORMAT_VERSION = 1


def run_to_dict(run: RunResult) -> dict[str, Any]:
    requests = [{**{k: v for k, v in asdict(r).items() if k not in ("token_times", "extra")},
                 "ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e, "itls": r.itls} for r in run.results]
    return {"label": run.label, "rate": run.rate, "concurrency": run.concurrency, "started_at": run.started_at,
            "duration_s": run.duration_s, "summary": run.summary.to_dict(), "loop_lag": asdict(run.loop_lag),
            "warnings": list(run.warnings), "requests": requests}


def save(path: Path, meta: dict[str, Any], runs: Sequence[RunResult]) -> None:
    """Write (or rewrite) a result file; called after every run so partial results survive."""
    body = {"version": FORMAT_VERSION, "date": dt.datetime.now().isoformat(timespec="seconds"), "meta": meta,
            "runs": [run_to_dict(r) for r in runs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1, default=_json_default) + "\n")


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def load(path: Path) -> dict[str, Any]:
    try:
        body: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a hetpd bench result ({exc})") from None
    if body.get("version") != FORMAT_VERSION or "runs" not in body:
        raise ValueError(f"{path}: not a hetpd bench result of version {FORMAT_VERSION}")
    return body


def _label(path: Path, body: dict[str, Any], run: dict[str, Any]) -> str:
    name = body.get("meta", {}).get("name") or Path(path).stem
    if run.get("rate") is not None:
        return f"{name} @{run['rate']:g}/s"
    if run.get("concurrency") is not None:
        return f"{name} c={run['concurrency']}"
    return str(name)


def compare_table(paths: Sequence[Path]) -> str:
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("requests ok", lambda s: f"{s['succeeded']}/{s['requests']}"),
        ("req/s", lambda s: f"{s['request_throughput']:.2f}"),
        ("output tok/s", lambda s: f"{s['output_throughput']:.1f}"),
        ("goodput req/s", lambda s: f"{s['goodput']:.2f}"),
        ("SLO attained", lambda s: f"{s['slo_attainment']:.0%}")]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for q in ("p50", "p90", "p99"):
            rows.append((f"{metric} {q} ms", _cell(metric, q)))
    columns: list[tuple[str, dict[str, Any]]] = []
    for path in paths:
        body = load(path)
        columns += [(_label(path, body, run), run["summary"]) for run in body["runs"]]
    width = max(14, *(len(c[0]) for c in columns))
    lines = [f"{'':<16}" + "".join(f"{label:>{width + 2}}" for label, _ in columns)]
    for name, cell in rows:
        lines.append(f"{name:<16}" + "".join(f"{cell(s):>{width + 2}}" for _, s in columns))
    return "\n".join(lines)


def _cell(metric: str, q: str) -> Callable[[dict[str, Any]], str]:
    return lambda summary: _ms(summary[metric][q])


def _ms(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{1000 * value:.1f}"


def plot(paths: Sequence[Path], out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # plotting is optional: the tables do not need it
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from exc
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for path in paths:
        body = load(path)
        for run in body["runs"]:
            label = _label(path, body, run)
            ok = [r for r in run["requests"] if r["ok"]]
            for ax, key in zip(axes[:3], ("ttft", "tpot", "e2e")):
                values = sorted(1000 * r[key] for r in ok if r[key] is not None)
                if values:
                    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
        rated = [run for run in body["runs"] if run.get("rate") is not None]
        if rated:
            name = body.get("meta", {}).get("name") or Path(path).stem
            rates = [run["rate"] for run in rated]
            axes[3].plot(rates, [run["summary"]["request_throughput"] for run in rated], "o-", label=f"{name} throughput")
            axes[3].plot(rates, [run["summary"]["goodput"] for run in rated], "s--", label=f"{name} goodput")
    for ax, title in zip(axes[:3], ("TTFT", "TPOT", "end-to-end latency")):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[3].set_title("throughput and goodput vs offered rate")
    axes[3].set_xlabel("offered requests/s")
    axes[3].set_ylabel("requests/s")
    axes[3].grid(alpha=0.3)
    if axes[3].lines:
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_report(paths: Sequence[Path], out: Path) -> tuple[Path, Path]:
    """Side-by-side table and plots of result files: ``report.png`` and ``report.html`` in ``out``."""
    table = compare_table(paths)
    png = plot(paths, out)
    image = base64.b64encode(png.read_bytes()).decode()
    page = (f"<!doctype html><meta charset='utf-8'><title>hetpd bench report</title>"
            f"<h1>hetpd bench report</h1><p>{html.escape(', '.join(str(p) for p in paths))}</p>"
            f"<pre>{html.escape(table)}</pre><img src='data:image/png;base64,{image}' style='max-width:100%'>")
    report = out / "report.html"
    report.write_text(page)
    return png, report
