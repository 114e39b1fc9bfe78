"""The deployment file: which workers run where, in which precision, over which transport.

One YAML file, validated with pydantic: unknown keys and bad values are refused with the
field's path named. It is what ``hetpd serve --config`` runs and what the planner writes.
Pure Python (no torch).

Example (the embedded default, precision chosen per role)::

    model: null                  # an HF folder; null = the embedded SmolLM2-135M-Instruct
    router: {host: 127.0.0.1, port: 8000}
    pools:
      - {name: prefill, role: prefill, dtype: float32, kv_cache_dtype: float32, transport: shm}
      - {name: decode, role: decode, dtype: bfloat16, kv_cache_dtype: int8, transport: shm}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hetpd.kv.format import canonical_kv_dtype
from hetpd.validation import validated

Role = Literal["prefill", "decode", "colocated"]
Transport = Literal["shm", "tcp", "inproc"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(_Strict):
    """A pool of identical workers: one role, one device kind, one precision."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role
    count: int = Field(1, ge=1, le=64)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantization: Literal["int8"] | None = None
    kv_cache_dtype: str = "float32"
    block_size: int = Field(16, ge=1, le=1024)
    num_kv_blocks: int | None = Field(None, ge=1, description="KV capacity in pages; default: kv_cache_memory_gb")
    kv_cache_memory_gb: float = Field(0.5, gt=0)
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_step_s: float | None = Field(None, gt=0, description="size prompt chunks so one engine step takes about "
                                                             "this long on this device (measured at start-up)")
    transport: Transport = "shm"

    @field_validator("kv_cache_dtype")
    @classmethod
    def _kv_dtype(cls, value: str) -> str:
        return canonical_kv_dtype(value)


class RouterConfig(_Strict):
    host: str = "127.0.0.1"  # localhost by default: expose deliberately
    port: int = Field(8000, ge=0, le=65535)
    control_port: int = Field(0, ge=0, le=65535, description="where workers connect; 0 = any free port")
    api_key: str | None = Field(None, description="Bearer token required on /v1/* and /metrics; env HETPD_API_KEY "
                                                  "or api_key_file also work")
    api_key_file: str | None = Field(None, description="a file holding the API key (kept off command lines)")
    secret: str | None = Field(None, description="shared secret of worker<->router control and the KV data plane; "
                                                 "env HETPD_SECRET or secret_file also work; generated if unset")
    secret_file: str | None = Field(None, description="a file holding the shared secret")
    max_queue: int = Field(64, ge=0, description="requests waiting for capacity before 503 + Retry-After")
    max_queue_wait_s: float = Field(15.0, gt=0, description="refuse at once (503 + Retry-After) a request the queue "
                                                            "would hold longer than this at the recent dispatch rate")
    metrics_public: bool = Field(False, description="serve /metrics without the API key even when one is set")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest HTTP request body; larger ones get 413")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a request's headers within this")
    body_timeout_s: float = Field(30.0, gt=0, description="and its body within this, once the headers arrived")


class SuperviseConfig(_Strict):
    """How ``hetpd serve`` keeps its workers alive and notices the ones that stop answering.

    Every worker sends the router a heartbeat from a thread of its own, so a long engine step
    does not silence it; a frozen or dead process does."""

    heartbeat_s: float = Field(0.5, gt=0, description="how often a worker tells the router it is alive")
    unresponsive_s: float = Field(3.0, gt=0, description="a worker silent this long gets no new requests, and its "
                                                         "requests in flight move to other workers")
    kill_after_s: float = Field(30.0, gt=0, description="a worker of this hetpd serve silent this long is killed "
                                                        "(and restarted, if restart is on)")
    restart: bool = Field(True, description="restart a worker of this hetpd serve that exited")
    max_restarts: int = Field(5, ge=0, description="restarts per worker within restart_window_s before giving up")
    restart_window_s: float = Field(300.0, gt=0)
    restart_backoff_s: float = Field(1.0, ge=0, description="wait before the first restart; doubles per restart in "
                                                            "the window")

    @model_validator(mode="after")
    def _ordered(self) -> SuperviseConfig:
        if not self.heartbeat_s < self.unresponsive_s < self.kill_after_s:
            raise ValueError(f"supervise: need heartbeat_s ({self.heartbeat_s}) < unresponsive_s "
                             f"({self.unresponsive_s}) < kill_after_s ({self.kill_after_s})")
        return self


class HandoffConfig(_Strict):
    lease_ttl_s: float = Field(10.0, gt=0)
    heartbeat_s: float = Field(2.0, gt=0)
    recovery: Literal["retry", "recompute", "fail"] = "retry"
    max_attempts: int = Field(2, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_below_ttl(self) -> HandoffConfig:
        if self.heartbeat_s >= self.lease_ttl_s:
            raise ValueError(f"handoff.heartbeat_s ({self.heartbeat_s}) must be below lease_ttl_s ({self.lease_ttl_s})")
        return self


class DeploymentConfig(_Strict):
    model: str | None = None
    served_model_name: str | None = None
    router: RouterConfig = RouterConfig()
    pools: list[PoolConfig]
    handoff: HandoffConfig = HandoffConfig()
    supervise: SuperviseConfig = SuperviseConfig()

    @model_validator(mode="after")
    def _pools_make_a_deployment(self) -> DeploymentConfig:
        roles = [p.role for p in self.pools]
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pools: names must be unique, got {names}")
        disaggregated = "prefill" in roles or "decode" in roles
        if disaggregated and not ("prefill" in roles and "decode" in roles):
            raise ValueError("pools: a disaggregated deployment needs at least one prefill and one decode pool")
        if not disaggregated and "colocated" not in roles:
            raise ValueError("pools: give a colocated pool, or prefill and decode pools")
        transports = {p.transport for p in self.pools if p.role != "colocated"}
        if len(transports) > 1:
            raise ValueError(f"pools: prefill and decode pools must share one transport, got {sorted(transports)}")
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "SmolLM2-135M-Instruct"


def default_deployment() -> DeploymentConfig:
    """One prefill and one decode worker of the embedded model, precision chosen per role:
    prefill computes in fp32 with fp32 KV, decode in bf16 with int8 KV, so every request's KV
    crosses the boundary through a real conversion (quantised on the prefill side)."""
    return DeploymentConfig(pools=[
        PoolConfig(name="prefill", role="prefill", dtype="float32", kv_cache_dtype="float32", num_kv_blocks=512),
        PoolConfig(name="decode", role="decode", dtype="bfloat16", kv_cache_dtype="int8", num_kv_blocks=1024),
    ])


class DeploymentError(ValueError):
    """A deployment file that cannot run; the message names each bad field and why."""


def load_deployment(path: str | Path) -> DeploymentConfig:
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path}: not valid YAML: {exc}") from None
    return parse_deployment(raw, str(path))


def parse_deployment(raw: object, where: str = "deployment") -> DeploymentConfig:
    return validated(DeploymentConfig, raw, DeploymentError, "deployment", where)
