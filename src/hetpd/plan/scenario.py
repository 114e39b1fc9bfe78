"""A planning scenario: the fleet, the link between pools, the model, the traffic and its SLOs,
and which choices the search may make. Validated with pydantic (field-named errors). Pure Python."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from hetpd.bench.workload import WorkloadConfig
from hetpd.validation import validated

Format = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "fp4"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetEntry(_Strict):
    accelerator: str
    count: int = Field(ge=1, le=4096)


class SLOConfig(_Strict):
    ttft_ms: float = Field(1000.0, gt=0)
    tpot_ms: float = Field(100.0, gt=0)


class SearchSpace(_Strict):
    weight_formats: list[Format] = ["bf16", "fp8"]
    kv_formats: list[Format] = ["bf16", "fp8"]  # decode's KV at rest
    wire_formats: list[Format] = ["bf16", "fp8", "int4"]  # KV on the link
    max_instances_per_pool: int = Field(8, ge=1)
    max_tensor_parallel: int = Field(1, ge=1, le=8)


class Scenario(_Strict):
    name: str = "scenario"
    model: str  # catalog id
    fleet: list[FleetEntry] = Field(min_length=1)
    link: str  # catalog id of the link between the prefill and the decode pool
    workload: WorkloadConfig
    slo: SLOConfig = SLOConfig()
    search: SearchSpace = SearchSpace()
    catalog: list[str] = []  # extra catalog YAML files (your accelerators, prices, links)
    calibration: str | None = None  # a `hetpd profile` file: its machine joins the catalog, priced by it (plan.calibrated)


class ScenarioError(ValueError):
    """A scenario file that cannot be planned; the message names each bad field."""


def parse_scenario(raw: Any, where: str = "scenario") -> Scenario:
    return validated(Scenario, raw, ScenarioError, "scenario", where)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read the scenario: {exc}") from None
    if isinstance(raw, dict):  # relative catalog and trace paths are taken from the scenario's folder
        raw["catalog"] = [str((path.parent / p).resolve()) for p in raw.get("catalog") or []]
        if raw.get("calibration"):
            raw["calibration"] = str((path.parent / raw["calibration"]).resolve())
        trace = (raw.get("workload") or {}).get("trace")
        if isinstance(trace, dict) and "path" in trace:
            trace["path"] = str((path.parent / trace["path"]).resolve())
    return parse_scenario(raw, str(path))
