#!/usr/bin/env python
"""Simulator fidelity: the planner's prediction against a real `hetpd serve`, measured by `hetpd bench`.

For a colocated deployment and a 1-prefill-1-decode one, on this machine: `hetpd profile` (with
the threads `hetpd serve` gives each worker), then `hetpd serve --step-trace` serves two
calibration loads (0.6 and 0.9 of the profiled capacity) of their own requests and each pool's
step model, interference and loop time are refitted to the steps it served, then the simulator picks light, medium and near-saturation rates from the capacity it
predicts, then `hetpd bench` measures the real deployment at each rate and the simulator
replays the same requests. Each point also reports the served steps' time over what the step
model predicted for them: how far the machine drifted from its calibration. Targets (issue 6): median
TTFT and median TPOT within 15%, goodput within 10%.

    .venv/bin/python benchmarks/fidelity.py [--num-requests 60] [--modes colocated,1P1D]

Writes benchmarks/results/fidelity/{fidelity.json,fidelity.md,fidelity.png} (and the raw bench,
profile and serve files beside them). Don't run it beside other heavy jobs: the deployment and
its profile share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from hetpd.plan.fidelity import HEADER, Agreement
from hetpd.plan.fidelity_run import FidelityConfig, ModeResult, run_fidelity

OUT = Path(__file__).parent / "results" / "fidelity"


def draw(results: list[ModeResult] | list[tuple[str, list[Agreement]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("TTFT p50 (ms)", "ttft_p50", 1000.0, 0.15), ("TPOT p50 (ms)", "tpot_p50", 1000.0, 0.15),
               ("goodput (req/s)", "goodput", 1.0, 0.10)]
    modes = [(m.mode, list(m.points)) if isinstance(m, ModeResult) else m for m in results]
    fig, axes = plt.subplots(len(modes), 3, figsize=(13, 3.6 * len(modes)), squeeze=False)
    for row, (label, points) in zip(axes, modes, strict=True):
        rates = [p.rate for p in points]
        for ax, (title, name, scale, target) in zip(row, metrics, strict=True):
            measured = [scale * getattr(p, f"measured_{name}") for p in points]
            simulated = [scale * getattr(p, f"simulated_{name}") for p in points]
            ax.fill_between(rates, [m * (1 - target) for m in measured], [m * (1 + target) for m in measured],
                            alpha=0.15, label=f"target: measured ±{target:.0%}")
            ax.plot(rates, measured, "o-", label="measured (hetpd serve + bench)")
            ax.plot(rates, simulated, "s--", label="simulated (calibrated)")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{label}: {title}")
            ax.set_xlabel("offered load (req/s)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--modes", default="colocated,1P1D")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--redraw", action="store_true", help="only redraw fidelity.png from the out folder's fidelity.json")
    args = p.parse_args()
    if args.redraw:
        raw = json.loads((args.out / "fidelity.json").read_text())
        fields = set(Agreement.__dataclass_fields__)
        draw([(m["mode"], [Agreement(**{k: v for k, v in point.items() if k in fields}) for point in m["points"]])
              for m in raw["modes"]], args.out / "fidelity.png")
        return
    config = FidelityConfig(modes=tuple(args.modes.split(",")), num_requests=args.num_requests)
    results = run_fidelity(config, args.out)
    points = [point for mode in results for point in mode.points]
    ratios = [ratio for mode in results for ratio in mode.step_ratios]
    lines = [HEADER + "   served steps / model"] + [
        point.row() + "   " + ", ".join(f"{pool} {r:.2f}" for pool, r in ratio.items())
        for point, ratio in zip(points, ratios, strict=True)]
    held = sum(point.within() for point in points)
    lines.append(f"{held}/{len(points)} load points within the targets (TTFT, TPOT within 15%; goodput within 10%)")
    drift = config.max_drift or float("inf")
    still = sum(any(abs(r - 1) > drift for r in ratio.values()) for ratio in ratios)
    if still:
        lines.append(f"{still} of them still ran more than {drift:.0%} off the calibrated step model after "
                     f"{config.drift_retries} retries")
    discarded = [(m.mode, point, ratio) for m in results for point, ratio in m.discarded]
    if discarded:
        lines += ["", f"Attempts measured again because the machine drifted from its calibration ({len(discarded)}):"]
        lines += [point.row() + "   " + ", ".join(f"{pool} {r:.2f}" for pool, r in ratio.items())
                  for _, point, ratio in discarded]
    print("\n".join(lines))
    (args.out / "fidelity.md").write_text("```\n" + "\n".join(lines) + "\n```\n")
    (args.out / "fidelity.json").write_text(json.dumps(
        {"config": asdict(config), "modes": [{"mode": m.mode, "capacity": m.capacity, "serving_overhead": asdict(m.overhead),
                                              "points": [{**asdict(p), "ttft_error": p.ttft_error,
                                                          "tpot_error": p.tpot_error,
                                                          "goodput_error": p.goodput_error,
                                                          "served_steps_over_model": r}
                                                         for p, r in zip(m.points, m.step_ratios, strict=True)],
                                              "discarded_for_drift": [{**asdict(p), "served_steps_over_model": r}
                                                                      for p, r in m.discarded]}
                                             for m in results]}, indent=1, default=str))
    draw(results, args.out / "fidelity.png")
    print(f"wrote {args.out / 'fidelity.md'}, fidelity.json and fidelity.png")


if __name__ == "__main__":
    main()
