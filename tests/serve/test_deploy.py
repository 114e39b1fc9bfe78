"""Deployment files: valid ones load, bad ones are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetpd.serve.deploy import DeploymentError, default_deployment, load_deployment, parse_deployment

P = {"name": "p", "role": "prefill"}
D = {"name": "d", "role": "decode"}


def test_default_deployment_differs_in_precision_per_role() -> None:
    deploy = default_deployment()
    prefill, decode = deploy.pools
    assert (prefill.role, decode.role) == ("prefill", "decode")
    assert (prefill.dtype, prefill.kv_cache_dtype) != (decode.dtype, decode.kv_cache_dtype)


def test_yaml_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("model: /models/x\nrouter: {port: 9000}\npools:\n"
                    "  - {name: p, role: prefill, kv_cache_dtype: fp8}\n  - {name: d, role: decode, count: 2}\n")
    deploy = load_deployment(path)
    assert deploy.router.port == 9000 and deploy.pools[0].kv_cache_dtype == "fp8_e4m3" and deploy.pools[1].count == 2


@pytest.mark.parametrize(("raw", "named"), [
    ({"pools": [P, D], "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ({"pools": [{**P, "kv_cache_dtype": "int3"}, D]}, "pools.0.kv_cache_dtype"),
    ({"pools": [{**P, "count": 0}, D]}, "pools.0.count"),
    ({"pools": [{**P, "role": "both"}, D]}, "pools.0.role"),
    ({"pools": [P]}, "needs at least one prefill and one decode pool"),
    ({"pools": [P, {**D, "transport": "tcp"}]}, "must share one transport"),
    ({"pools": [P, {**D, "name": "p"}]}, "names must be unique"),
    ({"pools": [P, D], "handoff": {"lease_ttl_s": 1, "heartbeat_s": 2}}, "heartbeat_s"),
    ({"pools": [P, D], "router": {"port": 70000}}, "router.port"),
])
def test_bad_deployments_name_the_field(raw: dict[str, object], named: str) -> None:
    with pytest.raises(DeploymentError, match="not a valid deployment") as caught:
        parse_deployment(raw)
    assert named in str(caught.value)


def test_broken_yaml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("pools: [\n")
    with pytest.raises(DeploymentError, match="not valid YAML"):
        load_deployment(path)
