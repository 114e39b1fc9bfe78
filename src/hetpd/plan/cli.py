"""``hetpd plan scenario.yaml``: search the placements, print the ranked table and what binds,
write JSON, the report and the deployment file.

Explanations cost simulations: the best placement gets the coupling matrix too (up to 16
simulations), the next two only the single-axis gains (up to 5 each)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hetpd.bench.workload import build_requests
from hetpd.plan.calibrated import load_calibrated
from hetpd.plan.explain import explain, gains_text
from hetpd.plan.scenario import ScenarioError, load_scenario
from hetpd.plan.search import (
    Evaluation,
    PlanResult,
    SearchProgress,
    build_config,
    plan,
    scenario_slo,
)
from hetpd.plan.spec import CatalogError, load_catalog

EXPLAINED = 3  # placements explained (and drawn in the report); the first also gets the coupling matrix


def _row(e: Evaluation) -> dict[str, Any]:
    r = e.result
    return {"candidate": asdict(e.candidate), "describe": e.candidate.describe(), "fits": e.fits, "reason": e.reason,
            "accelerators": e.accelerators, "goodput": e.goodput, "goodput_per_accelerator": e.goodput_per_accelerator,
            "goodput_bound": e.bound,
            "ttft_p50_s": r.ttft.p50 if r else None, "tpot_p50_s": r.tpot.p50 if r else None,
            "e2e_p50_s": r.e2e.p50 if r else None,
            "binding": r.binding if r else "capacity", "utilisation": None if r is None else
            {"prefill": r.prefill_utilisation, "decode": r.decode_utilisation, "link": r.link_utilisation},
            "peak_transient_bytes": r.peak_transient_bytes if r else None}


def searched(result: PlanResult, seconds: float | None = None, brute_force: bool = False) -> str:
    """One line: how many candidates the search rejected, simulated and pruned."""
    total = len(result.rejected) + result.simulated + len(result.pruned)
    took = "" if seconds is None else f" in {seconds:.1f} s"
    why = ("brute force: every fitting candidate simulated" if brute_force else
           f"their goodput bound keeps them out of the top {result.keep} and off the Pareto frontier")
    return (f"searched {total} candidates{took}: {len(result.rejected)} rejected, {result.simulated} simulated, "
            f"{len(result.pruned)} pruned ({why})")


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


class _Bar:
    """The search's progress on stderr, one rewritten line (at most about 20 updates a second)."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, p: SearchProgress) -> None:
        now = time.monotonic()
        if p.done < p.total and now - self.last < 0.05:
            return
        self.last = now
        width = 30
        filled = width * p.done // max(p.total, 1)
        print(f"\r[plan] [{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total} candidates: {p.rejected} rejected, "
              f"{p.simulated} simulated, {p.pruned} pruned", end="", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hetpd plan", description="search placements for a fleet, model and traffic")
    p.add_argument("scenario", type=Path)
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table (these are exact, as is the frontier)")
    p.add_argument("--rank-by", choices=["accelerator", "cost", "power"], default="accelerator",
                   help="goodput per accelerator, per $/h (needs price_per_hour in the catalog) or per kW of TDP")
    p.add_argument("--brute-force", action="store_true",
                   help="simulate every fitting candidate instead of pruning by the goodput bound (same table, slower)")
    p.add_argument("--exact-simulator", action="store_true",
                   help="simulate step by step on the runtime's own objects, not the fast mode (same decisions; slower)")
    p.add_argument("--json", type=Path, default=None,
                   help="write every candidate here: simulated ones in full, rejected ones with the reason, pruned ones "
                        "with their goodput bound")
    p.add_argument("--report", type=Path, default=None, help="write plan.png and plan.html into this folder")
    p.add_argument("--emit-deploy", type=Path, default=None, help="write the best placement's deployment file here")
    p.add_argument("--model-path", default=None, help="HF folder to put in the emitted deployment file")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    started = time.monotonic()
    try:
        scenario = load_scenario(args.scenario)
        extra = [Path(c) for c in scenario.catalog] + ([Path(scenario.calibration)] if scenario.calibration else [])
        catalog = load_catalog(extra)
        result = plan(scenario, catalog, progress=_Bar(), rank_by=args.rank_by, keep=max(args.top, EXPLAINED),
                      prune=not args.brute_force, exact=args.exact_simulator)
    except (ScenarioError, CatalogError, ValueError) as exc:
        print(f"\nhetpd plan: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    summary = searched(result, time.monotonic() - started, args.brute_force)
    print(summary)
    print(table(result, args.top))
    explained: list[dict[str, Any]] = []
    coupling: dict[str, dict[str, float]] | None = None
    model = catalog.model(scenario.model)
    requests = build_requests(scenario.workload)
    calibrated = load_calibrated(scenario.calibration) if scenario.calibration else None
    for i, e in enumerate(result.ranked[: min(EXPLAINED, args.top)]):
        built = build_config(e.candidate, scenario, catalog, model, requests, calibrated)
        if isinstance(built, Evaluation):
            continue
        why = explain(built[0], requests, scenario_slo(scenario), base=e.goodput, coupling=i == 0,
                      exact=args.exact_simulator)
        coupling = coupling or why.coupling
        print(f"{e.candidate.describe()}\n    binding: {why.binding}  (goodput gained when doubled: "
              f"{gains_text(why.gains)})")
        explained.append({"candidate": e.candidate.describe(), "binding": why.binding, "gains": why.gains,
                          "coupling": why.coupling})
    if args.report is not None:
        from hetpd.plan.report import draw, write_html

        fleet = [catalog.accelerator(f.accelerator) for f in scenario.fleet]
        png = draw(result, fleet, model, requests, coupling, args.report)
        print(f"wrote {write_html(png, summary, table(result, args.top), explained, args.report)} and {png}")
    if args.emit_deploy is not None and result.ranked:
        import yaml

        from hetpd.plan.emit import deployment_for

        deploy, notes = deployment_for(result.ranked[0].candidate, catalog, scenario.link, args.model_path)
        header = "".join(f"# note: {n}\n" for n in notes)
        args.emit_deploy.write_text(f"# hetpd plan: {result.ranked[0].candidate.describe()}\n{header}"
                                    + yaml.safe_dump(deploy, sort_keys=False))
        print(f"wrote {args.emit_deploy}" + (f" ({len(notes)} notes on what hetpd runs instead)" if notes else ""))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"scenario": scenario.model_dump(mode="json"),
                                         "search": {"candidates": len(result.rejected) + result.simulated
                                                    + len(result.pruned), "rejected": len(result.rejected),
                                                    "simulated": result.simulated, "pruned": len(result.pruned),
                                                    "exact_rows": result.keep, "rank_by": args.rank_by},
                                         "ranked": [_row(e) for e in result.ranked],
                                         "pareto": [_row(e) for e in result.pareto],
                                         # one line each: a big fleet rejects and prunes thousands
                                         "rejected": [{"describe": e.candidate.describe(), "reason": e.reason}
                                                      for e in result.rejected],
                                         "pruned": [{"describe": x.candidate.describe(), "accelerators": x.accelerators,
                                                     "goodput_bound": x.bound} for x in result.pruned],
                                         "explained": explained}, indent=1))
        print(f"wrote {args.json}")
    return 0
