"""KV format descriptor: JSON round trip, versioning, and naming what it cannot interpret."""

from __future__ import annotations

import json

import pytest
from kv_formats import ENCODINGS, fmt

from hetpd.kv.format import FORMAT_VERSION, IncompatibleKVError, KVFormat


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_json_round_trip(encoding: str) -> None:
    original = fmt(encoding, layout="HND", kv_split=False, head_start=1, head_end=3)
    text = original.to_json()
    assert json.loads(text)["version"] == FORMAT_VERSION
    assert KVFormat.from_json(text) == original and not original.problems()


def test_unknown_fields_are_kept_and_named_not_guessed() -> None:
    raw = json.loads(fmt("fp8-tensor-f32").to_json())
    raw["swizzle"] = 1
    raw["quant"]["block_scale"] = [128, 128]
    parsed = KVFormat.from_json(json.dumps(raw))
    assert parsed.unknown_fields == ("quant.block_scale", "swizzle")
    assert any("swizzle" in p for p in parsed.problems())


@pytest.mark.parametrize(("changes", "named"), [
    ({"dtype": "fp6_e3m2"}, "dtype 'fp6_e3m2'"),
    ({"layout": "NDH"}, "layout 'NDH'"),
    ({"version": 3}, "version 3"),
    ({"head_end": 9}, "head range"),
    ({"page_size": 0}, "page_size 0"),
    ({"scheme": "per_group"}, "scheme 'per_group' for int8"),
    ({"scale_dtype": "float64"}, "scale_dtype 'float64'"),
    ({"zero_point": True}, "zero_point"),
    ({"scale_location": "inline"}, "per_tensor scales live once per layer"),
])
def test_problems_name_the_field(changes: dict[str, object], named: str) -> None:
    broken = fmt("int8-tensor-f32").with_(**changes)
    assert any(named in p for p in broken.problems()), broken.problems()


def test_group_size_must_divide_head_dim() -> None:
    assert any("group_size 12" in p for p in fmt("int4-g32-f16", group_size=12).problems())


def test_missing_required_field_is_a_clear_error() -> None:
    raw = json.loads(fmt("fp32").to_json())
    del raw["page_size"]
    with pytest.raises(IncompatibleKVError, match="incomplete"):
        KVFormat.from_json(json.dumps(raw))


def test_sizes_match_the_documented_layout() -> None:
    f = fmt("int8-token-f16", page_size=4)
    # 2 layers x (K, V) x 3 pages x 4 slots x 4 heads x (32 one-byte codes + one 2-byte scale)
    assert f.payload_bytes(9) == 2 * 2 * 3 * 4 * 4 * (32 + 2)
    assert fmt("int4-g16z-f16").layer_bytes(16) == 2 * 16 * 4 * (16 + 2 * 2 * 2)
    assert fmt("fp8-tensor-f32").layer_bytes(16) == 2 * 16 * 4 * 32 + 2 * 4
