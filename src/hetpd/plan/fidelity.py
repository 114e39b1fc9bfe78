"""Simulate a ``hetpd serve`` deployment file, and compare the prediction with a measured run.

:func:`sim_config_for` turns a deployment (the file ``hetpd serve`` runs) plus what ``hetpd
profile`` measured (a step model per pool's thread count, the local transport as a link) into
the simulator's config: the same pools, page size, KV capacity, sequence and token budgets.
:func:`agreement` lines a :class:`~hetpd.plan.simulator.SimResult` up against the
:class:`~hetpd.bench.metrics.Summary` of ``hetpd bench`` on the same requests. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetpd.bench.metrics import Summary
from hetpd.kv.format import canonical_kv_dtype
from hetpd.plan.emit import ENGINE_KV_DTYPE
from hetpd.plan.served_steps import ServedCosts
from hetpd.plan.simulator import PoolSpec, SimConfig, SimResult
from hetpd.plan.spec import FORMAT_BYTES, Accelerator, Link, ModelShape
from hetpd.plan.step_model import MeasuredSteps
from hetpd.serve.deploy import DeploymentConfig, PoolConfig

# The engine's dtype names as the cost model's format names (the inverse of what emit writes).
_FORMAT = {engine: planner for planner, engine in ENGINE_KV_DTYPE.items()}


def _format(dtype: str, where: str) -> str:
    try:
        return _FORMAT[canonical_kv_dtype(dtype)]
    except (KeyError, ValueError):
        raise ValueError(f"{where}: {dtype!r} has no cost-model format; known: {sorted(_FORMAT)}") from None


def _pool(pool: PoolConfig, accelerator: Accelerator, steps: MeasuredSteps, served: ServedCosts) -> PoolSpec:
    if pool.num_kv_blocks is None:
        raise ValueError(f"pools.{pool.name}.num_kv_blocks: set it to simulate the pool (the capacity "
                         "derived from kv_cache_memory_gb depends on the model's KV width at start-up)")
    weights = "int8" if pool.quantization == "int8" else _format(pool.dtype, f"pools.{pool.name}.dtype")
    return PoolSpec(accelerator, pool.count, _format(pool.dtype, f"pools.{pool.name}.dtype"), weights,
                    _format(pool.kv_cache_dtype, f"pools.{pool.name}.kv_cache_dtype"),
                    pool.num_kv_blocks * pool.block_size, pool.max_num_seqs, pool.max_num_batched_tokens, steps,
                    interference=served.interference, loop=served.loop)


def sim_config_for(deploy: DeploymentConfig, model: ModelShape, accelerator: Accelerator,
                   steps: dict[str, MeasuredSteps], link: Link, served: dict[str, ServedCosts] | None = None,
                   control_latency_s: float = 0.0) -> SimConfig:
    """The simulator's view of ``deploy``, every worker on this host. ``steps`` maps each pool's
    name to the step model measured at that pool's thread count; ``served`` (default none) to what
    serving adds to its steps (interference beside a busy worker, the worker loop's own time),
    fitted by :func:`hetpd.plan.served_steps.refit`; ``link`` carries the KV between prefill
    and decode; ``control_latency_s``: a lease message's way from worker to worker through the
    router."""
    extra = served or {}
    missing = [p.name for p in deploy.pools if p.name not in steps]
    if missing:
        raise ValueError(f"steps: no measured step model for pools {missing}; profile them with `hetpd profile`")
    by_role = {p.role: p for p in deploy.pools}
    if len({p.role for p in deploy.pools}) != len(deploy.pools):
        raise ValueError("pools: simulate one pool per role (merge pools of a role into one with a count)")
    page = deploy.pools[0].block_size
    if any(p.block_size != page for p in deploy.pools):
        raise ValueError("pools.*.block_size: the simulator models one page size for the deployment")
    if "colocated" in by_role:
        pool = _pool(by_role["colocated"], accelerator, steps[by_role["colocated"].name],
                     extra.get(by_role["colocated"].name, ServedCosts()))
        return SimConfig(model, pool, pool, link, wire_fmt=pool.kv_fmt, page_tokens=page, colocated=True,
                         control_at_step_boundaries=True)
    prefill = _pool(by_role["prefill"], accelerator, steps[by_role["prefill"].name],
                    extra.get(by_role["prefill"].name, ServedCosts()))
    decode = _pool(by_role["decode"], accelerator, steps[by_role["decode"].name],
                   extra.get(by_role["decode"].name, ServedCosts()))
    # The KV crosses in the narrower of the two formats (the handoff planner converts on the
    # side that shrinks the wire).
    wire = min(prefill.kv_fmt, decode.kv_fmt, key=FORMAT_BYTES.__getitem__)
    # A hetpd worker reads lease messages between its engine steps (serve.worker's loop).
    return SimConfig(model, prefill, decode, link, wire_fmt=wire, page_tokens=page, control_at_step_boundaries=True,
                     control_latency_s=control_latency_s)


@dataclass(frozen=True)
class Agreement:
    """One load point: what ``hetpd bench`` measured against what the simulator predicted."""

    label: str
    rate: float
    measured_ttft_p50: float
    simulated_ttft_p50: float
    measured_tpot_p50: float
    simulated_tpot_p50: float
    measured_goodput: float
    simulated_goodput: float

    @staticmethod
    def _error(simulated: float, measured: float) -> float:
        return abs(simulated - measured) / measured if measured > 0 else float("inf")

    @property
    def ttft_error(self) -> float:
        return self._error(self.simulated_ttft_p50, self.measured_ttft_p50)

    @property
    def tpot_error(self) -> float:
        return self._error(self.simulated_tpot_p50, self.measured_tpot_p50)

    @property
    def goodput_error(self) -> float:
        return self._error(self.simulated_goodput, self.measured_goodput)

    def within(self, latency: float = 0.15, goodput: float = 0.10) -> bool:
        return self.ttft_error <= latency and self.tpot_error <= latency and self.goodput_error <= goodput

    def row(self) -> str:
        return (f"{self.label:<12}{self.rate:7.2f}"
                f"{1000 * self.measured_ttft_p50:10.0f}{1000 * self.simulated_ttft_p50:10.0f}{self.ttft_error:8.0%}"
                f"{1000 * self.measured_tpot_p50:9.1f}{1000 * self.simulated_tpot_p50:9.1f}{self.tpot_error:8.0%}"
                f"{self.measured_goodput:9.2f}{self.simulated_goodput:9.2f}{self.goodput_error:8.0%}")


HEADER = (f"{'deployment':<12}{'req/s':>7}{'TTFT ms':>10}{'sim':>10}{'err':>8}{'TPOT ms':>9}{'sim':>9}{'err':>8}"
          f"{'goodput':>9}{'sim':>9}{'err':>8}")


def agreement(label: str, rate: float, measured: Summary, simulated: SimResult) -> Agreement:
    return Agreement(label, rate, measured.ttft.p50, simulated.ttft.p50, measured.tpot.p50, simulated.tpot.p50,
                     measured.goodput, simulated.goodput)
