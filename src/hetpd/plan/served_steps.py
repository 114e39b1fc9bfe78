"""Fit the planner's step model to the steps a deployment served (``hetpd serve --step-trace``).

``hetpd profile`` times the engine alone, in a tight loop. A served worker's steps cost more:
its loop, streaming and control messages run between them, real traffic makes batch shapes a
profile does not (several prompt chunks beside decodes), and workers sharing a host slow each
other through memory bandwidth and caches. Each worker records its steps (work, wall and CPU
seconds); this module reads them back and refits:

* the step model, to the profile's steps plus the served steps taken while no other worker on
  the host was mid-step;
* the pool's **interference**: how much longer its steps run when another worker was mid-step
  as they started (total time over what the refitted model predicts, less one). The simulator
  applies it by the same rule (:attr:`hetpd.plan.simulator.PoolSpec.interference`);
* the pool's **loop cost** (:class:`~hetpd.plan.step_model.LoopCost`): the seconds its worker loop
  spends around each step (control messages, streaming, KV export and staging, leases), in which
  the worker starts no step (:attr:`hetpd.plan.simulator.PoolSpec.loop`).

Pure Python (the fit uses numpy).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from hetpd.core.step_work import StepWork
from hetpd.plan.step_model import LoopCost, StepFit, fit_steps_by_batch

MIN_BESIDE_STEPS = 10  # fewer steps taken beside a busy worker than this: no interference is fitted


@dataclass(frozen=True)
class ServedStep:
    worker: str
    work: StepWork
    seconds: float
    beside_busy: bool  # another worker recorded in the same trace folder was mid-step as this one started
    loop: float = 0.0  # the worker loop's own seconds before and after the step (0 in traces without them)


@dataclass(frozen=True)
class Refit:
    fit: StepFit  # the step model, fitted to the profile's steps and the served steps taken alone
    interference: float  # steps taken beside a busy worker ran (1 + this) times the model's time
    alone: int  # served steps the model was fitted to
    beside: int  # served steps the interference was measured on
    loop: LoopCost = LoopCost()  # the worker loop's own time around each step

    def summary(self) -> str:
        return (f"step model refitted to the profile and {self.alone} served steps (median error "
                f"{100 * self.fit.median_error:.1f}%); {self.beside} steps beside a busy worker ran "
                f"{100 * self.interference:.0f}% longer; the loop around a step: {1000 * self.loop.per_step:.2f} ms "
                f"+ {1e6 * self.loop.per_prompt_token:.1f} us per prompt token "
                f"+ {1e6 * self.loop.per_decode_seq:.1f} us per decoding sequence")


@dataclass(frozen=True)
class ServedCosts:
    """What serving adds to a pool's engine steps, as the simulator takes it (:class:`PoolSpec`'s
    ``interference`` and ``loop``)."""

    interference: float = 0.0
    loop: LoopCost = LoopCost()


def profiled_steps(path: Path) -> list[tuple[StepWork, float]]:
    """The engine steps a ``hetpd profile`` calibration file recorded (``measurements.steps``)."""
    raw = yaml.safe_load(path.read_text()) or {}
    rows = (raw.get("measurements") or {}).get("steps")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: measurements.steps is missing; write the file with `hetpd profile`")
    return [(StepWork(*row["work"]), float(row["seconds"])) for row in rows]


@dataclass(frozen=True)
class _Recorded:
    at: float
    wall: float
    work: StepWork
    loop: float


def _read(file: Path) -> list[_Recorded]:
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [_Recorded(float(r["at"]), float(r["wall"]), StepWork(*r["work"]),
                      float(r.get("before", 0.0)) + float(r.get("after", 0.0))) for r in rows]


def _busy_at(steps: list[_Recorded], starts: list[float], at: float) -> bool:
    """Whether one worker (its steps in order, never overlapping) was mid-step at ``at``."""
    index = bisect.bisect_right(starts, at) - 1
    return index >= 0 and steps[index].at + steps[index].wall > at


def served_steps(trace_dir: Path, workers: str = "") -> list[ServedStep]:
    """The steps served workers recorded in ``trace_dir``: every ``<worker id>.jsonl`` whose id starts
    with ``workers`` (``decode-`` picks the decode pool's workers). Each step is marked by whether
    any other worker of the folder was mid-step when it started."""
    recorded = {f.stem: _read(f) for f in sorted(trace_dir.glob("*.jsonl"))}
    mine = [name for name in recorded if name.startswith(workers)]
    if not mine:
        raise ValueError(f"{trace_dir}: no step traces{f' of workers {workers}*' if workers else ''}; "
                         "serve with `hetpd serve --step-trace DIR` and send it traffic first")
    starts = {name: [r.at for r in rows] for name, rows in recorded.items()}
    return [ServedStep(name, r.work, r.wall, any(_busy_at(recorded[other], starts[other], r.at)
                                                 for other in recorded if other != name), r.loop)
            for name in mine for r in recorded[name]]


def fit_loop(served: list[ServedStep]) -> LoopCost:
    """Least squares (absolute seconds: the total is what delays the next step) of the loop's time
    around each step on a constant, the step's prompt tokens and its decoding sequences. A term the
    data cannot support (a negative coefficient) is dropped and the rest refitted."""
    import numpy as np

    if not served:
        return LoopCost()
    rows = np.array([[1.0, s.work.prefill_tokens, s.work.decode_seqs] for s in served])
    target = np.array([s.loop for s in served])
    keep = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(rows[:, keep], target, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = [0.0, 0.0, 0.0]
    for index, value in zip(keep, coef, strict=True):
        full[index] = max(0.0, float(value))
    return LoopCost(*full)


def refit(calibration: Path, served: list[ServedStep], out: Path) -> Refit:
    """Refit the calibration's step model to its own steps plus the served steps taken alone, measure
    the interference on the rest, fit the loop time around every served step, and write the
    calibration with all three to ``out``."""
    alone = [(s.work, s.seconds) for s in served if not s.beside_busy]
    beside = [s for s in served if s.beside_busy]
    fit = fit_steps_by_batch(profiled_steps(calibration) + alone)
    interference = 0.0
    if len(beside) >= MIN_BESIDE_STEPS:
        predicted = sum(fit.model.seconds(s.work) for s in beside)
        interference = max(0.0, sum(s.seconds for s in beside) / predicted - 1.0)
    loop = fit_loop(served)
    raw = yaml.safe_load(calibration.read_text())
    raw["step_model"].update({"median_error": fit.median_error, "served_steps": len(alone),
                              "interference": interference, "interference_steps": len(beside),
                              "loop": dataclasses.asdict(loop), "terms": fit.model.as_dict()})
    out.write_text("# hetpd profile, the step model refitted to served steps (hetpd.plan.served_steps)\n"
                   + yaml.safe_dump(raw, sort_keys=False))
    return Refit(fit, interference, len(alone), len(beside), loop)


def load_served_costs(path: Path) -> ServedCosts:
    """A calibration's fitted interference and loop cost (none when it was never refitted to
    served steps)."""
    raw = yaml.safe_load(path.read_text()) or {}
    fitted = raw.get("step_model") or {}
    return ServedCosts(float(fitted.get("interference", 0.0)),
                       LoopCost.from_dict(fitted.get("loop") or {}, f"{path}: step_model.loop"))
