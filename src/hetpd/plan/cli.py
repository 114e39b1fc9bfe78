"""``hetpd plan scenario.yaml``: search the placements, print the ranked table, write JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hetpd.plan.scenario import ScenarioError, load_scenario
from hetpd.bench.workload import build_requests
from hetpd.plan.cost import Efficiency, load_efficiency
from hetpd.plan.explain import explain
from hetpd.plan.search import Evaluation, PlanResult, build_config, plan, scenario_slo
from hetpd.plan.spec import CatalogError, load_catalog


def _row(e: Evaluation) -> dict[str, Any]:
    r = e.result
    return {"candidate": asdict(e.candidate), "describe": e.candidate.describe(), "fits": e.fits, "reason": e.reason,
            "accelerators": e.accelerators, "goodput": e.goodput, "goodput_per_accelerator": e.goodput_per_accelerator,
            "ttft_p50_s": r.ttft.p50 if r else None, "tpot_p50_s": r.tpot.p50 if r else None,
            "binding": r.binding if r else "capacity", "utilisation": None if r is None else
            {"prefill": r.prefill_utilisation, "decode": r.decode_utilisation, "link": r.link_utilisation},
            "peak_transient_bytes": r.peak_transient_bytes if r else None}


def table(result: PlanResult, top: int) -> str:
    lines = [f"{'#':>3} {'placement':<78} {'goodput':>8} {'/accel':>7} {'TTFT50':>7} {'TPOT50':>7}  busiest  (KV handoff)"]
    for i, e in enumerate(result.ranked[:top], 1):
        r = e.result
        assert r is not None
        lines.append(f"{i:>3} {e.candidate.describe():<78} {e.goodput:8.2f} {e.goodput_per_accelerator:7.2f} "
                     f"{1000 * r.ttft.p50:6.0f}ms {1000 * r.tpot.p50:6.1f}ms  {r.binding}  ({e.reason})")
    if result.rejected:
        reasons: dict[str, int] = {}
        for e in result.rejected:
            reasons[e.reason.split(":")[0]] = reasons.get(e.reason.split(":")[0], 0) + 1
        lines.append("rejected: " + ", ".join(f"{n} for {why}" for why, n in reasons.items()))
    lines.append("pareto (accelerators -> goodput): " + ", ".join(f"{e.accelerators} -> {e.goodput:.2f}"
                                                               for e in result.pareto))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hetpd plan", description="search placements for a fleet, model and traffic")
    p.add_argument("scenario", type=Path)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--rank-by", choices=["accelerator", "cost", "power"], default="accelerator",
                   help="goodput per accelerator, per $/h (needs price_per_hour in the catalog) or per kW of TDP")
    p.add_argument("--json", type=Path, default=None, help="write every evaluated candidate here")
    p.add_argument("--report", type=Path, default=None, help="write plan.png and plan.html into this folder")
    p.add_argument("--emit-deploy", type=Path, default=None, help="write the best placement's deployment file here")
    p.add_argument("--model-path", default=None, help="HF folder to put in the emitted deployment file")
    args = p.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        extra = [Path(c) for c in scenario.catalog] + ([Path(scenario.calibration)] if scenario.calibration else [])
        catalog = load_catalog(extra)
        result = plan(scenario, catalog, progress=lambda i, n: print(f"\r[plan] {i}/{n} candidates", end="",
                                                                      file=sys.stderr, flush=True),
                      rank_by=args.rank_by)
    except (ScenarioError, CatalogError, ValueError) as exc:
        print(f"hetpd plan: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(table(result, args.top))
    explained: list[dict[str, Any]] = []
    coupling: dict[str, dict[str, float]] | None = None
    model = catalog.model(scenario.model)
    requests = build_requests(scenario.workload)
    for e in result.ranked[: min(3, args.top)]:
        efficiency = load_efficiency(scenario.calibration) if scenario.calibration else Efficiency()
        built = build_config(e.candidate, scenario, catalog, model, requests, efficiency)
        if isinstance(built, Evaluation):
            continue
        why = explain(built[0], requests, scenario_slo(scenario))
        coupling = coupling or why.coupling
        gains = ", ".join(f"{axis} +{100 * g:.0f}%" for axis, g in sorted(why.gains.items(), key=lambda kv: -kv[1]))
        print(f"{e.candidate.describe()}\n    binding: {why.binding}  (goodput gained when doubled: {gains})")
        explained.append({"candidate": e.candidate.describe(), "binding": why.binding, "gains": why.gains,
                          "coupling": why.coupling})
    if args.report is not None:
        from hetpd.plan.report import draw, write_html

        fleet = [catalog.accelerator(f.accelerator) for f in scenario.fleet]
        png = draw(result, fleet, model, requests, coupling, args.report)
        print(f"wrote {write_html(png, table(result, args.top), explained, args.report)} and {png}")
    if args.emit_deploy is not None and result.ranked:
        import yaml

        from hetpd.plan.emit import deployment_for

        deploy, notes = deployment_for(result.ranked[0].candidate, catalog, scenario.link, args.model_path)
        header = "".join(f"# note: {n}\n" for n in notes)
        args.emit_deploy.write_text(f"# hetpd plan: {result.ranked[0].candidate.describe()}\n{header}"
                                    + yaml.safe_dump(deploy, sort_keys=False))
        print(f"wrote {args.emit_deploy}" + (f" ({len(notes)} notes on what hetpd runs instead)" if notes else ""))
    if args.json is not None:
        args.json.write_text(json.dumps({"scenario": scenario.model_dump(mode="json"),
                                         "ranked": [_row(e) for e in result.ranked],
                                         "rejected": [_row(e) for e in result.rejected],
                                         "pareto": [_row(e) for e in result.pareto],
                                         "explained": explained}, indent=1))
        print(f"wrote {args.json}")
    return 0
