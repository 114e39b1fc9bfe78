"""The representation check: named verdicts, fields and fixes, and never a guess."""

from __future__ import annotations

import pytest
from kv_formats import MODEL, fmt

from hetpd.kv.check import VerdictKind, check
from hetpd.kv.format import KVFormat
from hetpd.kv.plan import plan_handoff

K = VerdictKind


def test_identical_formats() -> None:
    verdict = check(fmt("fp8-tensor-f32"), fmt("fp8-tensor-f32"))
    assert verdict.kind is K.IDENTICAL and verdict.steps == () and verdict.error_bound.exact


@pytest.mark.parametrize(("changes", "step"), [
    ({"page_size": 8}, "repage"),
    ({"layout": "HND"}, "permute_layout"),
    ({"kv_split": False}, "regroup_kv"),
    ({"head_start": 2}, "select_heads"),
])
def test_relayouts_are_lossless(changes: dict[str, object], step: str) -> None:
    verdict = check(fmt("int8-token-f32"), fmt("int8-token-f32", **changes))
    assert verdict.kind is K.LOSSLESS_RELAYOUT and verdict.steps == (step,)


def test_moving_scales_inline_is_a_relayout() -> None:
    verdict = check(fmt("int4-g32-f16"), fmt("int4-g32-f16", scale_location="inline"))
    assert verdict.kind is K.LOSSLESS_RELAYOUT and verdict.steps == ("move_scales",)


@pytest.mark.parametrize(("producer", "consumer", "kind"), [
    ("bf16", "fp32", K.LOSSLESS_WIDENING),
    ("fp16", "fp32", K.LOSSLESS_WIDENING),
    ("int8-token-f16", "fp32", K.LOSSLESS_WIDENING),  # 7-bit code x 11-bit scale fits fp32's 24 bits
    ("fp8-token-bf16", "fp32", K.LOSSLESS_WIDENING),
    ("int4-g32-f16", "fp32", K.LOSSLESS_WIDENING),
    ("int8-token-f32", "fp32", K.LOSSY),  # 7 + 24 bits: the product rounds
    ("int4-g16z-f16", "fp32", K.LOSSY),  # adding the zero point rounds
    ("bf16", "fp16", K.LOSSY),
    ("fp32", "fp8-tensor-f32", K.LOSSY),
    ("int8-token-f32", "int8-tensor-f32", K.LOSSY),
])
def test_value_changes(producer: str, consumer: str, kind: VerdictKind) -> None:
    verdict = check(fmt(producer), fmt(consumer))
    assert verdict.kind is kind
    assert verdict.error_bound.exact == (kind is not K.LOSSY)


def test_another_model_is_incompatible_with_every_field_named() -> None:
    other = KVFormat(MODEL.__class__(**{**MODEL.__dict__, "num_layers": 3, "tokenizer_hash": "t1"}), "float32", 16, 0, 4)
    verdict = check(fmt("fp32"), other)
    assert verdict.kind is K.INCOMPATIBLE
    assert {d.field for d in verdict.differences} == {"model.num_layers", "model.tokenizer_hash"}
    assert "same model" in verdict.explain()


@pytest.mark.parametrize(("consumer", "named"), [
    (fmt("fp32", rope_applied=False), "rope_applied"),
    (fmt("fp32", head_start=2, head_end=4), "head range"),
    (fmt("fp32", dtype="fp6_e3m2"), "fp6_e3m2"),
    (fmt("fp32", version=3), "version 3"),
    (fmt("fp32", unknown_fields=("swizzle",)), "swizzle"),
])
def test_incompatible_cases_name_the_field_and_the_fix(consumer: KVFormat, named: str) -> None:
    producer = fmt("fp32", head_start=0, head_end=2) if named == "head range" else fmt("fp32")
    verdict = check(producer, consumer)
    assert verdict.kind is K.INCOMPATIBLE and named in verdict.explain()
    assert all(d.fix for d in verdict.differences)


def test_tensor_parallel_shards_overlap() -> None:
    """A TP=2 producer shard feeding a TP=1 consumer supplies half of its heads (merge)."""
    verdict = check(fmt("bf16", head_start=2, head_end=4), fmt("bf16"))
    assert verdict.kind is K.LOSSLESS_RELAYOUT and verdict.heads == (2, 4)


def test_plan_converts_where_the_wire_is_smaller() -> None:
    narrowing = plan_handoff(fmt("fp32"), fmt("int8-token-f32"))
    assert narrowing.site == "producer" and narrowing.wire == fmt("int8-token-f32")
    widening = plan_handoff(fmt("fp8-tensor-f32"), fmt("bf16"))
    assert widening.site == "consumer" and widening.wire == fmt("fp8-tensor-f32")
    assert widening.wire_bytes(100) < fmt("bf16").payload_bytes(100)
    tie = plan_handoff(fmt("bf16"), fmt("bf16", layout="HND"))
    assert tie.site == "producer"  # equal bytes: keep the decode side's bandwidth for decoding
    split = plan_handoff(fmt("fp32"), fmt("fp32", head_start=0, head_end=2))
    assert split.site == "producer" and split.wire_bytes(16) == fmt("fp32").payload_bytes(16) // 2
    assert plan_handoff(fmt("fp16"), fmt("fp16")).site == "none"


def test_a_forced_wire_format_converts_on_both_sides() -> None:
    plan = plan_handoff(fmt("bf16"), fmt("bf16"), wire=fmt("int4-g16z-f16"))
    assert plan.site == "both" and plan.verdict.kind is K.LOSSY
    assert plan.producer_steps == ("quantise",) and plan.consumer_steps == ("dequantise",)


def test_the_documented_verdict_table_is_what_the_code_says() -> None:
    from pathlib import Path

    from hetpd.kv.table import END, START, render

    doc = (Path(__file__).parents[2] / "docs" / "kv-boundary.md").read_text()
    assert doc[doc.index(START) + len(START):doc.index(END)] == render(), \
        "docs/kv-boundary.md is stale: run `python -m hetpd.kv.table --update docs/kv-boundary.md`"
