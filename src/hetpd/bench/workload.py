"""The workload of a benchmark: when each request is sent and how many tokens it has.

A :class:`WorkloadConfig` (YAML or CLI flags, validated with pydantic: unknown keys and bad
values are refused with the field's path named) combines an *arrival* process with a *lengths*
distribution; :func:`build_requests` turns it into :class:`RequestSpec`\\ s. Pure Python (no torch).

Example::

    arrival: {kind: gamma, rate: 4.0, cv: 2.0}    # bursty: CV of the gaps 2 (1 = Poisson)
    lengths: {kind: trace}                         # input/output lengths (and prefixes) of the trace
    trace: {path: mooncake.jsonl, format: mooncake}  # relative paths: from the YAML file's folder
    num_requests: 500                              # null with a trace: all of it
    seed: 0

Every arrival kind combines with every lengths kind; "trace" in either needs a ``trace``.
Invariants of the result: ``index`` is the position in the list; ``at`` is None for every
request (fixed concurrency) or for none, then starts at 0.0 and never decreases; every length
is clamped to ``[1, max_input_tokens]`` / ``[1, max_output_tokens]``. The same config, seed
and rate always give the same requests (private ``random.Random`` streams, never the global one).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hetpd.bench.traces import UNTIMED_FORMATS, Trace, TraceFormat, TraceRecord, read_trace
from hetpd.validation import validated


class WorkloadError(ValueError):
    """A workload that cannot be built; the message names the field and the fix."""


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: ``at`` seconds after the start (None: as soon as a slot frees)."""

    index: int
    at: float | None
    input_tokens: int
    output_tokens: int
    prefix_ids: tuple[int, ...] = ()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------- arrivals
class ConcurrencyArrival(_Strict):
    """A fixed number of requests in flight; each is sent when the previous one in its slot ends."""

    kind: Literal["concurrency"] = "concurrency"
    concurrency: int = Field(ge=1)


class PoissonArrival(_Strict):
    kind: Literal["poisson"] = "poisson"
    rate: float = Field(gt=0, description="requests per second")


class GammaArrival(_Strict):
    """Gamma-distributed gaps of mean ``1/rate``; ``cv`` (std/mean of the gaps) sets the
    burstiness: 1 is Poisson, above 1 bursty, below 1 more regular than Poisson."""

    kind: Literal["gamma"] = "gamma"
    rate: float = Field(gt=0, description="requests per second")
    cv: float = Field(gt=0, description="coefficient of variation of the inter-arrival gaps")


class TraceArrival(_Strict):
    """The trace's own timestamps (times ``time_scale``), shifted to start at 0."""

    kind: Literal["trace"] = "trace"


Arrival = Annotated[ConcurrencyArrival | PoissonArrival | GammaArrival | TraceArrival, Field(discriminator="kind")]


# -------------------------------------------------------------------------------- lengths
class FixedLengths(_Strict):
    kind: Literal["fixed"] = "fixed"
    input: int = Field(ge=1)
    output: int = Field(ge=1)


class UniformLengths(_Strict):
    """Integers drawn uniformly from ``[lo, hi]`` (both included)."""

    kind: Literal["uniform"] = "uniform"
    input: tuple[int, int]
    output: tuple[int, int]

    @field_validator("input", "output")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 1 <= lo <= hi:
            raise ValueError(f"must be [lo, hi] with 1 <= lo <= hi, got [{lo}, {hi}]")
        return value


class LognormalLengths(_Strict):
    """Log-normal lengths of the given mean (tokens); ``*_sigma`` is the sigma of the underlying
    normal (0 = always the mean), so ``mu = ln(mean) - sigma**2 / 2``."""

    kind: Literal["lognormal"] = "lognormal"
    input_mean: float = Field(gt=0)
    input_sigma: float = Field(ge=0)
    output_mean: float = Field(gt=0)
    output_sigma: float = Field(ge=0)


class TraceLengths(_Strict):
    """The trace's lengths and prefix ids, in its order (wrapping around when it is too short)."""

    kind: Literal["trace"] = "trace"


Lengths = Annotated[FixedLengths | UniformLengths | LognormalLengths | TraceLengths, Field(discriminator="kind")]


class TraceSource(_Strict):
    path: str = Field(min_length=1)
    format: TraceFormat | None = Field(None, description="null: sniffed from the file")


class WorkloadConfig(_Strict):
    arrival: Arrival
    lengths: Lengths
    trace: TraceSource | None = None
    num_requests: int | None = Field(None, ge=1, description="null: the whole trace")
    seed: int = 0
    max_input_tokens: int = Field(4096, ge=1)
    max_output_tokens: int = Field(1024, ge=1)
    time_scale: float = Field(1.0, gt=0, description="trace timestamps are multiplied by it")

    @model_validator(mode="after")
    def _trace_where_needed(self) -> WorkloadConfig:
        uses = [name for name, part in (("arrival", self.arrival), ("lengths", self.lengths)) if part.kind == "trace"]
        if uses and self.trace is None:
            raise ValueError(f"{uses[0]}: kind 'trace' needs a trace: {{path: ..., format: ...}}")
        if self.trace is not None and not uses:
            raise ValueError("trace: given but unused; set arrival or lengths to {kind: trace}, or remove it")
        if self.trace is None and self.num_requests is None:
            raise ValueError("num_requests: required without a trace (with one, null replays the whole trace)")
        if self.arrival.kind == "trace" and self.trace is not None and self.trace.format in UNTIMED_FORMATS:
            raise ValueError(f"arrival: a {self.trace.format} trace has no timestamps; "
                             "use poisson, gamma or concurrency arrivals")
        return self


def parse_workload(raw: object, where: str = "workload") -> WorkloadConfig:
    return validated(WorkloadConfig, raw, WorkloadError, "workload", where)


def load_workload(path: str | Path) -> WorkloadConfig:
    """Read a workload YAML; a relative ``trace.path`` is taken from the YAML file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read the workload: {exc}") from None
    except yaml.YAMLError as exc:
        raise WorkloadError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(raw, dict) and isinstance(raw.get("trace"), dict) and isinstance(raw["trace"].get("path"), str):
        trace_path = Path(raw["trace"]["path"]).expanduser()
        raw = {**raw, "trace": {**raw["trace"], "path": str(path.parent / trace_path)}}
    return parse_workload(raw, str(path))


def dump_workload(config: WorkloadConfig) -> str:
    """YAML text that :func:`load_workload` reads back to an equal config (keep ``trace.path``
    absolute, or relative to the folder the YAML is written to)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------- build
def build_requests(config: WorkloadConfig, rate: float | None = None,
                   count_tokens: Callable[[str], int] | None = None) -> list[RequestSpec]:
    """The requests of ``config``. ``rate`` (requests/s) replaces the configured rate, for sweeps;
    with trace arrivals it rescales the trace to that mean rate (``time_scale`` is then unused).
    ``count_tokens`` is needed for a ShareGPT trace only. Synthetic lengths with trace arrivals
    carry no prefix ids (those describe the trace's own prompts)."""
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise WorkloadError(f"rate: must be a positive number of requests/s, got {rate}")
    if rate is not None and config.arrival.kind == "concurrency":
        raise WorkloadError("rate: a fixed-concurrency workload has no rate; use poisson or gamma arrivals to sweep")
    trace = _load_trace(config, count_tokens)
    n = config.num_requests if config.num_requests is not None else len(trace.records) if trace else 0
    records = _cycle(trace.records, n) if trace else []
    if config.arrival.kind == "trace":
        assert trace is not None  # the config validator
        stamps = _trace_times(trace, records, config.time_scale, rate)
        # Send order is time order; equal times keep the trace's order (sorted is stable).
        order = sorted(range(n), key=stamps.__getitem__)
        times: list[float | None] = [stamps[i] for i in order]
        records = [records[i] for i in order]
    else:
        times = _synthetic_times(config, n, rate)
    lengths = _lengths(config, records, n)
    return [RequestSpec(i, at, min(max(1, inp), config.max_input_tokens), min(max(1, out), config.max_output_tokens),
                        prefix) for i, (at, (inp, out, prefix)) in enumerate(zip(times, lengths, strict=True))]


def _load_trace(config: WorkloadConfig, count_tokens: Callable[[str], int] | None) -> Trace | None:
    if config.trace is None:
        return None
    trace = read_trace(config.trace.path, config.trace.format, count_tokens, limit=config.num_requests)
    if not trace.records:
        raise WorkloadError(f"trace: {trace.source} has no usable requests ({trace.skipped} skipped)")
    if config.arrival.kind == "trace" and not trace.timed:
        raise WorkloadError(f"arrival: {trace.source} has no timestamps; use poisson, gamma or concurrency arrivals")
    return trace


def _cycle(records: tuple[TraceRecord, ...], n: int) -> list[TraceRecord]:
    return [records[i % len(records)] for i in range(n)]


def _trace_times(trace: Trace, records: list[TraceRecord], time_scale: float, rate: float | None) -> list[float]:
    """Times of ``records`` (the trace cycled to n): each further pass over the trace starts one
    trace span plus one mean gap after the previous pass, so a replay longer than the trace keeps
    its rate; then shifted to start at 0 and scaled."""
    stamps = [r.at or 0.0 for r in trace.records]
    start, span = min(stamps), max(stamps) - min(stamps)
    period = span + (span / (len(stamps) - 1) if len(stamps) > 1 else 0.0)
    m = len(trace.records)
    times = [((r.at or 0.0) - start + (i // m) * period) for i, r in enumerate(records)]
    first = min(times)
    times = [t - first for t in times]
    if rate is None:
        return [t * time_scale for t in times]
    duration = max(times)
    if duration <= 0:
        raise WorkloadError(f"rate: the trace's requests all arrive at once; cannot rescale it to {rate}/s")
    factor = (len(times) - 1) / (rate * duration)
    return [t * factor for t in times]


def _synthetic_times(config: WorkloadConfig, n: int, rate: float | None) -> list[float | None]:
    arrival = config.arrival
    if arrival.kind == "concurrency":
        return [None] * n
    if not isinstance(arrival, PoissonArrival | GammaArrival):
        raise AssertionError(arrival)
    rate = rate if rate is not None else arrival.rate
    # A private stream per aspect: switching the arrival kind never changes the lengths drawn.
    rng = random.Random(f"hetpd-bench-arrival:{config.seed}")
    if isinstance(arrival, PoissonArrival):
        def gap() -> float:
            return rng.expovariate(rate)
    else:
        shape = 1.0 / arrival.cv**2  # gamma: cv = 1/sqrt(shape), mean = shape * scale = 1/rate
        scale = 1.0 / (rate * shape)

        def gap() -> float:
            return rng.gammavariate(shape, scale)
    times: list[float | None] = [0.0]  # the first request goes out at once
    now = 0.0
    for _ in range(n - 1):
        now += gap()
        times.append(now)
    return times[:n]


def _lengths(config: WorkloadConfig, records: list[TraceRecord], n: int) -> list[tuple[int, int, tuple[int, ...]]]:
    lengths = config.lengths
    if isinstance(lengths, TraceLengths):
        return [(r.input_tokens, r.output_tokens, r.prefix_ids) for r in records]
    rng = random.Random(f"hetpd-bench-lengths:{config.seed}")
    if isinstance(lengths, FixedLengths):
        return [(lengths.input, lengths.output, ())] * n
    if isinstance(lengths, UniformLengths):
        return [(rng.randint(*lengths.input), rng.randint(*lengths.output), ()) for _ in range(n)]

    def lognormal(mean: float, sigma: float) -> int:
        return round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma))
    return [(lognormal(lengths.input_mean, lengths.input_sigma), lognormal(lengths.output_mean, lengths.output_sigma), ())
            for _ in range(n)]
