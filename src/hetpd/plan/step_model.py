"""What one engine step costs: the work a step does, and two ways to price it.

A step's work is four numbers the scheduler's output determines: prompt tokens computed,
causal attention (query, key) pairs among them, sequences decoding one token, and the context
those decoding sequences attend to. :class:`RooflineSteps` prices it from an accelerator's
catalog peaks (the roofline of :mod:`hetpd.plan.cost`); :class:`MeasuredSteps` from step times
``hetpd profile`` measured on the engine itself, fitted by :func:`fit_steps`. The simulator
asks either one through :class:`StepCoster`. Pure Python (the fit uses numpy).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from hetpd.core.step_work import StepWork
from hetpd.plan.cost import Efficiency, StageTime, step_time
from hetpd.plan.spec import Accelerator, ModelShape


class StepCoster(Protocol):
    def seconds(self, work: StepWork) -> float:
        """How long a step doing ``work`` takes."""
        ...


@dataclass(frozen=True)
class RooflineSteps:
    """The catalog roofline: compute in ``compute_fmt`` against reading weights and KV."""

    model: ModelShape
    accelerator: Accelerator
    compute_fmt: str
    weight_fmt: str
    kv_fmt: str
    efficiency: Efficiency = Efficiency()

    def seconds(self, work: StepWork) -> float:
        return self.time(work).seconds

    def time(self, work: StepWork) -> StageTime:
        return step_time(self.model, self.accelerator, self.compute_fmt, self.weight_fmt, self.kv_fmt,
                         work.prefill_tokens, work.prefill_pairs, work.decode_seqs, work.decode_context,
                         self.efficiency)


@dataclass(frozen=True)
class MeasuredSteps:
    """Step time fitted to measurements of the engine (``hetpd profile``)::

        overhead + max(weights, prefill_token * prefill_tokens + decode_seq * decode_seqs)
                 + prefill_pair * prefill_pairs + decode_context * decode_context

    ``weights`` is the floor a small batch pays for reading the weights; the token terms take
    over once the matmuls are compute-bound; attention adds per pair (prompts) and per context
    token (decodes). All in seconds, all non-negative.

    ``decode_batch_factor[b - 1]`` multiplies a decode-only step of ``b`` sequences (none: 1).
    Matmul libraries pick kernels by row count, so a step's cost is not monotone in its batch:
    measured here with oneDNN on one thread, a decode step of 2 sequences ran ~1.25x the line
    through its neighbours, and one of 8 ~1.3x. For a fixed batch the step stays affine in its
    context, which the fast simulator relies on."""

    overhead: float
    weights: float
    prefill_token: float
    decode_seq: float
    prefill_pair: float
    decode_context: float
    decode_batch_factor: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        terms = {name: value for name, value in asdict(self).items() if name != "decode_batch_factor"}
        negative = [name for name, value in terms.items() if not value >= 0]
        if negative:
            raise ValueError(f"step model terms {negative} must be non-negative seconds")
        if not all(f > 0 for f in self.decode_batch_factor):
            raise ValueError(f"decode_batch_factor: every factor must be positive, got {self.decode_batch_factor}")

    def seconds(self, work: StepWork) -> float:
        line = (self.overhead + max(self.weights, self.prefill_token * work.prefill_tokens
                                    + self.decode_seq * work.decode_seqs)
                + self.prefill_pair * work.prefill_pairs + self.decode_context * work.decode_context)
        return line * _batch_factor(self.decode_batch_factor, work)

    def as_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = asdict(self)
        raw["decode_batch_factor"] = list(self.decode_batch_factor)
        return raw

    @classmethod
    def from_dict(cls, raw: Any, where: str = "steps") -> MeasuredSteps:
        names = set(cls.__dataclass_fields__) - {"decode_batch_factor"}
        if not isinstance(raw, dict) or not names <= set(raw) <= names | {"decode_batch_factor"}:
            raise ValueError(f"{where}: needs exactly the terms {sorted(names)}, and optionally decode_batch_factor "
                             "(write it with `hetpd profile`)")
        factors = raw.get("decode_batch_factor") or []
        if not isinstance(factors, list):
            raise ValueError(f"{where}.decode_batch_factor: a list of factors, one per decode batch size from 1")
        return cls(**{name: float(raw[name]) for name in names}, decode_batch_factor=tuple(float(f) for f in factors))


@dataclass(frozen=True)
class LoopCost:
    """What a served worker's own loop spends around each engine step, which no engine profile
    sees: control messages read before it; outputs streamed, KV offered, exported and staged,
    transfers polled and leases ticked after it (``hetpd serve --step-trace`` records both)::

        per_step + per_prompt_token * prefill_tokens + per_decode_seq * decode_seqs

    The worker starts no step while its loop runs, so the simulator adds it to the step's time.
    Fitted by :func:`hetpd.plan.served_steps.fit_loop`; all terms non-negative seconds."""

    per_step: float = 0.0
    per_prompt_token: float = 0.0
    per_decode_seq: float = 0.0

    def __post_init__(self) -> None:
        negative = [name for name, value in asdict(self).items() if not value >= 0]
        if negative:
            raise ValueError(f"loop cost terms {negative} must be non-negative seconds")

    def seconds(self, work: StepWork) -> float:
        return self.per_step + self.per_prompt_token * work.prefill_tokens + self.per_decode_seq * work.decode_seqs

    @classmethod
    def from_dict(cls, raw: Any, where: str = "loop") -> LoopCost:
        names = set(cls.__dataclass_fields__)
        if not isinstance(raw, dict) or not set(raw) <= names:
            raise ValueError(f"{where}: a mapping of {sorted(names)} (write it with `hetpd profile --served-steps`)")
        return cls(**{name: float(value) for name, value in raw.items()})


@dataclass(frozen=True)
class StepFit:
    model: MeasuredSteps
    median_error: float  # median relative error over the measurements
    worst_error: float


def fit_steps(samples: Sequence[tuple[StepWork, float]]) -> StepFit:
    """Least-squares fit of :class:`MeasuredSteps` to (work, seconds) samples, on relative error.

    The ``max`` makes it piecewise linear: for each candidate weights floor (0, and each sample's
    time) the remaining terms are linear; the floor with the smallest error wins. Terms the data
    cannot support (a negative coefficient) are dropped and the rest refitted."""
    import numpy as np

    if len(samples) < 4:
        raise ValueError(f"samples: need at least 4 measured steps to fit a step model, got {len(samples)}")
    if any(not seconds > 0 for _, seconds in samples):
        raise ValueError("samples: every measured step time must be positive")
    times = np.array([s for _, s in samples])
    works = [w for w, _ in samples]

    def solve(floor: float) -> tuple[float, MeasuredSteps] | None:
        # Columns: overhead, prefill_token, decode_seq, prefill_pair, decode_context. A sample whose
        # token terms stay under the floor pays the floor instead of them (decided by the fit itself,
        # two passes: assume everyone above the floor, then re-split by the first fit).
        above = [True] * len(works)
        for _ in range(3):
            rows = [[1.0, w.prefill_tokens * a, w.decode_seqs * a, w.prefill_pairs, w.decode_context]
                    for w, a in zip(works, above, strict=True)]
            target = times - np.array([0.0 if a else floor for a in above])
            keep = list(range(5))
            while True:
                design = np.array(rows)[:, keep] / times[:, None]
                coef, *_ = np.linalg.lstsq(design, target / times, rcond=None)
                if (coef >= 0).all() or len(keep) == 1:
                    break
                keep.pop(int(np.argmin(coef)))
            full = [0.0] * 5
            for index, value in zip(keep, coef, strict=True):
                full[index] = max(0.0, float(value))
            model = MeasuredSteps(full[0], floor, full[1], full[2], full[3], full[4])
            split = [model.prefill_token * w.prefill_tokens + model.decode_seq * w.decode_seqs >= floor for w in works]
            if split == above:
                break
            above = split
        errors = np.abs(np.array([model.seconds(w) for w in works]) - times) / times
        return float(np.mean(errors**2)), model

    candidates = [solve(floor) for floor in itertools.chain([0.0], sorted(set(float(t) * f for t in times
                                                                                for f in (0.5, 0.8, 1.0))))]
    _, best = min((c for c in candidates if c is not None), key=lambda c: c[0])
    return _fit_of(best, samples)


def _fit_of(model: MeasuredSteps, samples: Sequence[tuple[StepWork, float]]) -> StepFit:
    errors = sorted(abs(model.seconds(w) - s) / s for w, s in samples)
    return StepFit(model, errors[len(errors) // 2], errors[-1])


def _batch_factor(factors: tuple[float, ...], work: StepWork) -> float:
    """The factor of ``factors`` (one per decode batch size from 1) a step takes: its batch's if it
    only decodes and the batch has one, else 1."""
    if not work.prefill_tokens and 0 < work.decode_seqs <= len(factors):
        return factors[work.decode_seqs - 1]
    return 1.0


MIN_BATCH_SAMPLES = 3  # decode-only steps of one batch size needed to give it its own factor


def batch_factors(model: MeasuredSteps, samples: Sequence[tuple[StepWork, float]]) -> tuple[float, ...]:
    """Per decode batch size, the measured decode-only steps' total time over what ``model``'s line
    predicts for them (1 where fewer than :data:`MIN_BATCH_SAMPLES` were measured)."""
    line = dataclasses.replace(model, decode_batch_factor=())
    sums: dict[int, list[float]] = {}
    for work, seconds in samples:
        if not work.prefill_tokens and work.decode_seqs:
            total = sums.setdefault(work.decode_seqs, [0, 0.0, 0.0])
            total[0] += 1
            total[1] += seconds
            total[2] += line.seconds(work)
    measured = {b: t[1] / t[2] for b, t in sums.items() if t[0] >= MIN_BATCH_SAMPLES and t[2] > 0}
    return tuple(measured.get(b, 1.0) for b in range(1, max(measured, default=0) + 1))


def fit_steps_by_batch(samples: Sequence[tuple[StepWork, float]], rounds: int = 2) -> StepFit:
    """:func:`fit_steps`, then a factor per decode batch size (:func:`batch_factors`); the line is
    refitted with each decode-only sample divided by its batch's factor, so a slow kernel at one
    batch size does not tilt the line for the others."""
    fit = fit_steps(samples)
    factors: tuple[float, ...] = ()
    for _ in range(rounds):
        # Relative to the typical batch size: the line and the factors trade a common scale for
        # decode-only steps, and the median batch is the one to keep on the line.
        factors = batch_factors(fit.model, samples)
        typical = statistics.median(factors) if factors else 1.0
        factors = tuple(f / typical for f in factors)

        fit = fit_steps([(w, s / _batch_factor(factors, w)) for w, s in samples])
    return _fit_of(dataclasses.replace(fit.model, decode_batch_factor=batch_factors(fit.model, samples)), samples)
