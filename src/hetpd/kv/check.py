"""Boundary decision 2, representation: can the consumer use the producer's KV bytes? Pure Python.

``check(producer, consumer)`` compares two :class:`KVFormat` descriptors field by field and
returns a named :class:`Verdict`. It never guesses: a field or value it does not know makes
the verdict incompatible, with the fields named and what to change.

Verdicts, from best to worst:

============================  =====================================================================
identical                     the bytes are usable as they are
lossless_relayout             same values, moved: re-page, NHD<->HND, K/V split<->joint, scales
                              inline<->separate, select or merge tensor-parallel head shards
lossless_widening             every value is exactly representable on the consumer (bf16 -> fp32,
                              int8 x fp16 scale -> fp32)
lossy                         values are re-encoded; ``error_bound`` says how far they may move
incompatible                  the bytes mean something else (other model, RoPE not applied, ...)
============================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hetpd.kv.bounds import UNIT_ROUNDOFF, ErrorBound, dequantise_exactly, encoding_bound
from hetpd.kv.format import FLOAT_DTYPES, KVFormat, ModelFingerprint


class VerdictKind(Enum):
    IDENTICAL = "identical"
    LOSSLESS_RELAYOUT = "lossless_relayout"
    LOSSLESS_WIDENING = "lossless_widening"
    LOSSY = "lossy"
    INCOMPATIBLE = "incompatible"

    @property
    def rank(self) -> int:
        return list(VerdictKind).index(self)


@dataclass(frozen=True)
class FieldDifference:
    field: str
    producer: str
    consumer: str
    fix: str = ""  # for fields no conversion can bridge: what to change

    def describe(self) -> str:
        text = f"{self.field}: producer {self.producer} vs consumer {self.consumer}"
        return f"{text} ({self.fix})" if self.fix else text


@dataclass(frozen=True)
class Verdict:
    """What it takes for the consumer to use the producer's bytes.

    ``steps`` are the conversion steps in execution order (empty when identical). ``heads`` is
    the range of model kv heads this producer supplies to this consumer (their overlap).
    ``error_bound`` holds for every element against the value the producer's bytes encode.
    """

    kind: VerdictKind
    differences: tuple[FieldDifference, ...] = ()
    steps: tuple[str, ...] = ()
    error_bound: ErrorBound = field(default_factory=lambda: ErrorBound(0.0, "token_head"))
    heads: tuple[int, int] | None = None

    @property
    def usable(self) -> bool:
        return self.kind is not VerdictKind.INCOMPATIBLE

    def explain(self) -> str:
        parts = [self.kind.value]
        if self.steps:
            parts.append("steps: " + ", ".join(self.steps))
        if self.kind is VerdictKind.LOSSY or (self.kind is VerdictKind.LOSSLESS_WIDENING and not self.error_bound.exact):
            parts.append("error " + self.error_bound.describe())
        if self.differences:
            parts.append("; ".join(d.describe() for d in self.differences))
        return " | ".join(parts)


_SAME_MODEL = "serve the same model (same config.json and tokenizer) on both sides"


def check(producer: KVFormat, consumer: KVFormat) -> Verdict:
    """The verdict for moving ``producer``-format KV into a ``consumer``-format cache."""
    problems = [FieldDifference(f"producer {p}", "unknown", "-", "upgrade hetpd or change the producer's KV format")
                for p in producer.problems()]
    problems += [FieldDifference(f"consumer {p}", "-", "unknown", "upgrade hetpd or change the consumer's KV format")
                 for p in consumer.problems()]
    if problems:
        return Verdict(VerdictKind.INCOMPATIBLE, tuple(problems))
    blocking = _model_differences(producer.model, consumer.model)
    if producer.rope_applied != consumer.rope_applied:
        blocking.append(FieldDifference("rope_applied", str(producer.rope_applied), str(consumer.rope_applied),
                                        "store K after RoPE on both sides (hetpd engines always do)"))
    start, end = max(producer.head_start, consumer.head_start), min(producer.head_end, consumer.head_end)
    if start >= end:
        blocking.append(FieldDifference(
            "head range", f"[{producer.head_start}, {producer.head_end})", f"[{consumer.head_start}, {consumer.head_end})",
            "pair shards whose kv-head ranges overlap"))
    if blocking:
        return Verdict(VerdictKind.INCOMPATIBLE, tuple(blocking))

    differences, steps = _layout_steps(producer, consumer)
    value_kind, value_steps, bound = _value_change(producer, consumer)
    if not _same_codec(producer, consumer):
        differences.append(FieldDifference("encoding", _encoding(producer), _encoding(consumer)))
    kind = VerdictKind.LOSSLESS_RELAYOUT if steps else VerdictKind.IDENTICAL
    if value_kind is not None:
        kind = value_kind
    value_order: tuple[str, ...] = ("select_heads", "dequantise", "cast", "quantise")
    ordered = tuple(s for s in value_order if s in steps + value_steps)
    ordered += tuple(s for s in steps if s != "select_heads")
    return Verdict(kind, tuple(differences), ordered, bound, (start, end))


def _model_differences(p: ModelFingerprint, c: ModelFingerprint) -> list[FieldDifference]:
    names = ("architecture", "num_layers", "num_kv_heads", "head_dim", "rope", "tokenizer_hash", "config_hash")
    return [FieldDifference(f"model.{n}", str(getattr(p, n)), str(getattr(c, n)), _SAME_MODEL)
            for n in names if getattr(p, n) != getattr(c, n)]


def _layout_steps(p: KVFormat, c: KVFormat) -> tuple[list[FieldDifference], tuple[str, ...]]:
    """Lossless byte moves: which fields differ and the step each one needs."""
    differences: list[FieldDifference] = []
    steps: list[str] = []
    if (p.head_start, p.head_end) != (c.head_start, c.head_end):
        differences.append(FieldDifference("head range", f"[{p.head_start}, {p.head_end})", f"[{c.head_start}, {c.head_end})"))
        steps.append("select_heads")
    for name, step in (("page_size", "repage"), ("layout", "permute_layout"), ("kv_split", "regroup_kv")):
        if getattr(p, name) != getattr(c, name):
            differences.append(FieldDifference(name, str(getattr(p, name)), str(getattr(c, name))))
            steps.append(step)
    if p.quantised and c.quantised and p.quant.scale_location != c.quant.scale_location:
        differences.append(FieldDifference("scale_location", p.quant.scale_location, c.quant.scale_location))
        steps.append("move_scales")
    return differences, tuple(steps)


def _encoding(fmt: KVFormat) -> str:
    q = fmt.quant
    if q.scheme == "none":
        return fmt.dtype
    group = f"/{q.group_size}" if q.group_size else ""
    zero = "+zero" if q.zero_point else ""
    return f"{fmt.dtype} {q.scheme}{group}{zero} {q.scale_dtype} scales"


def _same_codec(p: KVFormat, c: KVFormat) -> bool:
    pq, cq = p.quant, c.quant
    return (p.dtype, pq.scheme, pq.scale_dtype, pq.group_size, pq.zero_point) == (
        c.dtype, cq.scheme, cq.scale_dtype, cq.group_size, cq.zero_point)


def _value_change(p: KVFormat, c: KVFormat) -> tuple[VerdictKind | None, tuple[str, ...], ErrorBound]:
    """How element values change (None: they don't), the steps, and the error bound."""
    exact = ErrorBound(0.0, "token_head")
    if _same_codec(p, c):
        return None, (), exact
    if p.dtype in FLOAT_DTYPES and c.dtype in FLOAT_DTYPES:
        if c.dtype == "float32":  # bf16 and fp16 are subsets of fp32
            return VerdictKind.LOSSLESS_WIDENING, ("cast",), exact
        return VerdictKind.LOSSY, ("cast",), encoding_bound(c.dtype, "none", None)
    if p.quantised and c.dtype in FLOAT_DTYPES:
        if dequantise_exactly(p.dtype, p.quant.scale_dtype, p.quant.zero_point, c.dtype):
            return VerdictKind.LOSSLESS_WIDENING, ("dequantise",), exact
        # code * scale (+ zero) is computed in float32 and rounded once into the consumer's dtype.
        floor = 2.0**-25 if c.dtype == "float16" else 0.0
        return VerdictKind.LOSSY, ("dequantise",), ErrorBound(UNIT_ROUNDOFF[c.dtype] + 2.0**-22, "token_head", floor)
    steps = ("dequantise", "quantise") if p.quantised else ("quantise",)
    q = c.quant
    return VerdictKind.LOSSY, steps, encoding_bound(c.dtype, q.scheme, q.scale_dtype, q.zero_point)


def worst(first: Verdict, second: Verdict) -> Verdict:
    """The verdict of two conversions in a row (producer -> wire -> consumer)."""
    kind = max(first.kind, second.kind, key=lambda k: k.rank)
    steps = first.steps + tuple(s for s in second.steps if s not in first.steps)
    heads = second.heads if first.heads is None else first.heads
    return Verdict(kind, first.differences + second.differences, steps,
                   first.error_bound.loosest(second.error_bound), heads)
