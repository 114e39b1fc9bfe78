"""Which pools a ``hetpd profile`` calibration speaks for, and what it tells the planner about them.

A profile measures one machine (it joins the catalog as an accelerator, ``local``) running one
model in one format. So:

* its achieved efficiencies (compute, memory) price the pools **on that accelerator** (unsplit:
  a tensor-parallel instance is another device); every other accelerator keeps the catalog
  defaults (:class:`~hetpd.plan.cost.Efficiency`);
* its fitted step model (:class:`~hetpd.plan.step_model.MeasuredSteps`) replaces the roofline only
  for pools on that accelerator running **the profiled model shape in the profiled format**; a
  step model of one model says nothing about another's steps. (The KV format at rest is not
  matched: the profiled engine's attention cost stands in for it.)

Pure Python; reading the file is the only I/O, in :func:`load_calibrated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hetpd.plan.cost import Efficiency
from hetpd.plan.spec import ModelShape
from hetpd.plan.step_model import MeasuredSteps

# The model dimensions a step model depends on (parameter counts follow from them).
SHAPE_FIELDS = ("layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "vocab_size")


def shape_of(model: ModelShape) -> dict[str, int]:
    """The dimensions of ``model`` a calibration records and matches on."""
    return {name: int(getattr(model, name)) for name in SHAPE_FIELDS}


@dataclass(frozen=True)
class PoolCalibration:
    """What a calibration says about one pool: ``None`` where it does not apply."""

    efficiency: Efficiency | None = None
    steps: MeasuredSteps | None = None


@dataclass(frozen=True)
class Calibrated:
    accelerator: str  # the catalog id the profile registered the machine under
    efficiency: Efficiency
    steps: MeasuredSteps | None = None  # None: the file has no step model, or does not say what it measured
    shape: tuple[tuple[str, int], ...] = ()  # the profiled model's dimensions (SHAPE_FIELDS)
    compute_fmt: str | None = None  # the format the profiled engine computed in

    def for_pool(self, accelerator: str, model: ModelShape, compute_fmt: str) -> PoolCalibration:
        """The efficiency and step model for a pool of ``accelerator`` running ``model`` in ``compute_fmt``."""
        if accelerator != self.accelerator:
            return PoolCalibration()
        same_steps = (self.steps is not None and dict(self.shape) == shape_of(model)
                      and compute_fmt == self.compute_fmt)
        return PoolCalibration(self.efficiency, self.steps if same_steps else None)


def load_calibrated(path: str | Path) -> Calibrated:
    """A ``hetpd profile`` file as the planner uses it. A file from before the profile recorded its
    model and format still gives its efficiencies; its step model is then left unused."""
    raw: Any = yaml.safe_load(Path(path).read_text()) or {}
    measured = raw.get("efficiency")
    if not isinstance(measured, dict) or not {"compute", "memory"} <= set(measured):
        raise ValueError(f"{path}: no efficiency {{compute, memory}} section; write it with `hetpd profile`")
    accelerators = raw.get("accelerators") or []
    if len(accelerators) != 1 or not isinstance(accelerators[0], dict) or "id" not in accelerators[0]:
        raise ValueError(f"{path}: accelerators: a calibration registers exactly one accelerator (the profiled "
                         "machine); write it with `hetpd profile`")
    efficiency = Efficiency(compute=float(measured["compute"]), memory=float(measured["memory"]))
    step_model = raw.get("step_model") or {}
    shape, fmt = step_model.get("model"), step_model.get("format")
    if not (isinstance(shape, dict) and set(shape) == set(SHAPE_FIELDS) and isinstance(fmt, str)
            and "terms" in step_model):
        return Calibrated(str(accelerators[0]["id"]), efficiency)
    steps = MeasuredSteps.from_dict(step_model["terms"], f"{path}: step_model.terms")
    return Calibrated(str(accelerators[0]["id"]), efficiency, steps,
                      tuple((name, int(shape[name])) for name in SHAPE_FIELDS), fmt)
