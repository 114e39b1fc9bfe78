"""Which constraint binds, and which axes interact: answered by experiment on the simulator.

For a placement, each axis's resource is doubled in turn (prefill compute, decode memory
bandwidth, decode KV capacity, the link, conversion) and the simulator re-run on the same
requests. The axis whose relief raises goodput most is the binding constraint. Doubling two
axes at once and comparing with the two single gains gives the coupling matrix: a positive
entry means the pair only pays off together (they bind jointly), a negative one that they
relieve the same bottleneck. A relief that leaves the deployment as it was (doubling the
conversion rate where nothing converts) is not simulated again: its goodput is the one known.
Pure Python.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from hetpd.bench.workload import RequestSpec
from hetpd.plan.bound import charged_goodput, horizon_for
from hetpd.plan.search import run_simulator
from hetpd.plan.simulator import SimConfig
from hetpd.bench.metrics import SLO

AXES = ("prefill compute", "decode bandwidth", "decode capacity", "link", "conversion")


def relieve(config: SimConfig, axis: str) -> SimConfig:
    """The same deployment with twice the resource behind ``axis``."""
    if axis == "prefill compute":
        acc = config.prefill.accelerator
        faster = dataclasses.replace(acc, peak_tflops={k: 2 * v for k, v in acc.peak_tflops.items()})
        return dataclasses.replace(config, prefill=dataclasses.replace(config.prefill, accelerator=faster))
    if axis == "decode bandwidth":
        acc = config.decode.accelerator
        wider = dataclasses.replace(acc, memory_tbps=2 * acc.memory_tbps)
        return dataclasses.replace(config, decode=dataclasses.replace(config.decode, accelerator=wider))
    if axis == "decode capacity":
        return dataclasses.replace(config, decode=dataclasses.replace(config.decode,
                                                                      kv_pool_tokens=2 * config.decode.kv_pool_tokens))
    if axis == "link":
        link = config.link
        return dataclasses.replace(config, link=dataclasses.replace(link, peak_unidir_gbps=2 * link.peak_unidir_gbps,
                                                                    per_transfer_overhead_us=link.per_transfer_overhead_us / 2))
    if axis == "conversion":
        gbps = config.conversion_gbps
        return dataclasses.replace(config, conversion_gbps=None if gbps is None else 2 * gbps)
    raise ValueError(f"axis {axis!r} is unknown; choose one of {AXES}")


@dataclass(frozen=True)
class Explanation:
    goodput: float
    gains: dict[str, float]  # goodput gained when the axis's resource doubles (relative)
    coupling: dict[str, dict[str, float]] | None  # joint gain minus the two single gains (relative); None: not asked

    @property
    def binding(self) -> str:
        best = max(self.gains, key=self.gains.__getitem__)
        return best if self.gains[best] > 0.01 else "none (the offered load is served)"


def gains_text(gains: dict[str, float]) -> str:
    """The gains, largest first, in whole percent with their sign ("link +12%, conversion +0%")."""
    return ", ".join(f"{axis} {round(100 * g):+d}%" for axis, g in sorted(gains.items(), key=lambda kv: -kv[1]))


def explain(config: SimConfig, requests: list[RequestSpec], slo: SLO, axes: tuple[str, ...] = AXES,
            base: float | None = None, coupling: bool = True, exact: bool = False) -> Explanation:
    """Relieve each axis (and, with ``coupling``, each pair) and re-simulate; goodput as the planner
    counts it (:func:`hetpd.plan.bound.charged_goodput`). ``base``: the deployment's goodput when
    the caller already simulated it. ``exact``: the step-by-step simulator, not its fast mode
    (:func:`hetpd.plan.search.run_simulator`). Simulations: one per distinct
    relieved deployment, at most ``1 + len(axes)`` plus ``len(axes) * (len(axes) - 1) / 2`` pairs."""
    known: list[tuple[SimConfig, float]] = [] if base is None else [(config, base)]
    horizon = horizon_for(requests)

    def goodput(deployment: SimConfig) -> float:
        for seen, value in known:
            if seen == deployment:
                return value
        value = charged_goodput(run_simulator(deployment, requests, slo, horizon, exact), horizon)
        known.append((deployment, value))
        return value

    start = goodput(config)
    scale = max(start, 1e-9)

    def gain(*names: str) -> float:
        relieved = config
        for name in names:
            relieved = relieve(relieved, name)
        return (goodput(relieved) - start) / scale

    gains = {axis: gain(axis) for axis in axes}
    if not coupling:
        return Explanation(start, gains, None)
    matrix: dict[str, dict[str, float]] = {a: {b: 0.0 for b in axes} for a in axes}
    for a, b in itertools.combinations(axes, 2):
        joint = gain(a, b) - gains[a] - gains[b]
        matrix[a][b] = matrix[b][a] = joint
    return Explanation(start, gains, matrix)
