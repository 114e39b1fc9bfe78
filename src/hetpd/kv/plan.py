"""Where a conversion runs: the handoff plan that minimises bytes on the wire. Pure Python.

Quantise before sending, dequantise after: the wire carries whichever side's encoding is
smaller, so a narrowing conversion runs on the producer and a widening one on the consumer.
Ties go to the producer, keeping the decode side's memory bandwidth for decoding. A caller
may also force a wire format (say int4 over a slow link); then both sides may convert.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetpd.kv.check import Verdict, VerdictKind, check, worst
from hetpd.kv.format import IncompatibleKVError, KVFormat


@dataclass(frozen=True)
class HandoffPlan:
    """How one producer's KV reaches one consumer.

    ``verdict`` is end to end; ``producer_steps`` run before sending (bytes leave in ``wire``
    format), ``consumer_steps`` after receiving. ``site`` is "none", "producer", "consumer" or "both".
    """

    verdict: Verdict
    wire: KVFormat
    producer_steps: tuple[str, ...]
    consumer_steps: tuple[str, ...]

    @property
    def site(self) -> str:
        return {(False, False): "none", (True, False): "producer", (False, True): "consumer",
                (True, True): "both"}[(bool(self.producer_steps), bool(self.consumer_steps))]

    def wire_bytes(self, num_tokens: int) -> int:
        return self.wire.payload_bytes(num_tokens)


def plan_handoff(producer: KVFormat, consumer: KVFormat, wire: KVFormat | None = None) -> HandoffPlan:
    """Plan a handoff; raises :class:`IncompatibleKVError` (naming the fields) when there is none."""
    direct = check(producer, consumer)
    if not direct.usable or direct.heads is None:
        raise IncompatibleKVError("KV handoff impossible: " + direct.explain())
    start, end = direct.heads
    if wire is None:
        options = [producer.with_(head_start=start, head_end=end), consumer.with_(head_start=start, head_end=end)]
        # Fewest bytes per token wins; on a tie the producer converts (second option) -- see module docstring.
        wire = min(reversed(options), key=lambda f: f.bytes_per_token())
    first, second = check(producer, wire), check(wire, consumer)
    for leg in (first, second):
        if not leg.usable:
            raise IncompatibleKVError("wire format unusable: " + leg.explain())
    verdict = direct if wire in (producer, consumer) or _is_narrowed(wire, producer, consumer) else worst(first, second)
    if verdict.kind is VerdictKind.INCOMPATIBLE:  # pragma: no cover - guarded above
        raise IncompatibleKVError(verdict.explain())
    return HandoffPlan(verdict, wire, first.steps, second.steps)


def _is_narrowed(wire: KVFormat, producer: KVFormat, consumer: KVFormat) -> bool:
    """The wire is one side's own format, only cut to the shared heads (no extra encoding step)."""
    heads = {"head_start": wire.head_start, "head_end": wire.head_end}
    return wire in (producer.with_(**heads), consumer.with_(**heads))
