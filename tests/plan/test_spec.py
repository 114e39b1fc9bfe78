"""The built-in catalog: every number with a confidence flag and a source; user entries override."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetpd.plan.spec import CatalogError, ModelShape, load_catalog


def test_builtin_catalog_entries_carry_confidence_and_sources() -> None:
    catalog = load_catalog()
    assert len(catalog.accelerators) >= 15 and len(catalog.links) >= 20 and len(catalog.models) >= 7
    for entry in [*catalog.accelerators.values(), *catalog.links.values(), *catalog.models.values()]:
        assert entry.confidence in ("high", "medium", "low") and entry.sources, entry.id
    h100 = catalog.accelerator("nvidia_h100_sxm")
    assert h100.flops("bf16") == pytest.approx(989.4e12) and h100.memory_tbps == pytest.approx(3.35)
    assert h100.flops("int4") == h100.flops("bf16")  # no int4 units on Hopper: dequantised to 16-bit


def test_kv_sizes_match_the_model_cards() -> None:
    catalog = load_catalog()
    assert catalog.model("llama_3_1_8b").kv_elements_per_token() * 2 == 131072  # 128 KiB per token in bf16
    assert catalog.model("deepseek_v3").kv_elements_per_token() == 61 * (512 + 64)  # MLA latent cache


def test_user_entries_add_and_override(tmp_path: Path) -> None:
    extra = tmp_path / "fleet.yaml"
    extra.write_text("accelerators:\n  - {id: my_card, name: Mine, vendor: Me, peak_tflops: {bf16: 100}, memory_gb: 32,"
                     " memory_tbps: 1.0, price_per_hour: 1.5, confidence: high, sources: [https://example.org]}\n"
                     "  - {id: nvidia_h100_sxm, name: H100 (our clocks), vendor: NVIDIA, peak_tflops: {bf16: 800},"
                     " memory_gb: 80, memory_tbps: 3.0, confidence: medium, sources: [measured]}\n")
    catalog = load_catalog([extra])
    assert catalog.accelerator("my_card").price_per_hour == 1.5
    assert catalog.accelerator("nvidia_h100_sxm").flops("bf16") == 800e12


def test_bad_entries_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("accelerators:\n  - {id: x, name: X, vendor: V, peak_tflops: {bf16: 1}, memory_gb: 8}\n")
    with pytest.raises(CatalogError, match=r"bad.yaml: .*'x'.*memory_tbps"):
        load_catalog([bad])
    with pytest.raises(CatalogError, match="unknown accelerator 'nope'"):
        load_catalog().accelerator("nope")


def test_shape_from_an_hf_config(smollm2_dir: Path) -> None:
    from hetpd.models.config import ModelConfig

    shape = ModelShape.from_config(ModelConfig.from_dir(smollm2_dir), "smollm2")
    assert shape.params_total_b == pytest.approx(0.1346, rel=0.01)  # SmolLM2-135M (tied embeddings)
    assert shape.kv_elements_per_token() == 2 * 30 * 3 * 64


def test_numeric_formats_carry_their_effective_bits_and_native_hardware() -> None:
    from hetpd.plan.spec import FORMAT_BYTES

    catalog = load_catalog()
    by_planner_name = {f.planner_name: f for f in catalog.formats.values() if f.planner_name}
    assert set(by_planner_name) == set(FORMAT_BYTES) - {"fp32"}
    for name, entry in by_planner_name.items():  # the cost model's bytes are the catalog's effective bits
        assert FORMAT_BYTES[name] == pytest.approx(entry.bytes_per_element, rel=1e-3), name
        assert entry.effective_bits >= entry.element_bits and (entry.sources or entry.element_bits == 16)
    int4 = by_planner_name["int4"]
    assert int4.effective_bits > 4 and not int4.native_on  # dequantised in-kernel everywhere
    assert "nvidia_h100_sxm" in by_planner_name["fp8"].native_on
    assert "nvidia_a100_80gb_sxm" not in by_planner_name["fp8"].native_on
