"""Prometheus metrics of one router (its own registry: no process-wide state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("hetpd_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("hetpd_inter_token_latency_seconds", "Mean gap between output tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("hetpd_e2e_request_latency_seconds", "Arrival to finish", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.handoff = Histogram("hetpd_kv_handoff_seconds", "KV transfer start to commit on the decode side",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.transfer = Histogram("hetpd_kv_transfer_seconds", "KV bytes on the wire: transfer start to verified",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.conversion = Histogram("hetpd_kv_conversion_seconds",
                                    "Decode side: verified bytes to committed pages (unpack, convert, write)",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("hetpd_queue_depth", "Requests waiting for capacity", registry=r)
        self.requests = Counter("hetpd_requests_total", "Requests by outcome", ["outcome"], registry=r)
        self.pages_in_use = Gauge("hetpd_kv_pages_in_use", "KV pages in use", ["worker", "role"], registry=r)
        self.pages_total = Gauge("hetpd_kv_pages_total", "KV pages in the pool", ["worker", "role"], registry=r)
        self.live_leases = Gauge("hetpd_leases_live", "Handoff leases not yet ended", ["worker", "role"], registry=r)
        self.transient = Gauge("hetpd_kv_transient_bytes", "Bytes held for handoffs (ledger)", ["worker", "role"],
                               registry=r)
        self.leases_ended = Counter("hetpd_leases_ended_total", "Ended leases by side and state", ["side", "state"],
                                    registry=r)
        self.bytes_received = Gauge("hetpd_kv_bytes_received", "KV payload bytes a decode worker committed (cumulative)",
                                    ["worker", "role"], registry=r)

    def worker_stats(self, worker_id: str, role: str, stats: dict[str, Any]) -> None:
        self.pages_in_use.labels(worker_id, role).set(stats["pages_in_use"])
        self.pages_total.labels(worker_id, role).set(stats["pages_total"])
        self.live_leases.labels(worker_id, role).set(stats["live_leases"])
        self.transient.labels(worker_id, role).set(stats["transient_bytes"])
        self.bytes_received.labels(worker_id, role).set(stats["kv_bytes_received"])

    def worker_gone(self, worker_id: str, role: str) -> None:
        """A worker left: its last numbers must not stay on the dashboards as if current."""
        for gauge in (self.pages_in_use, self.pages_total, self.live_leases, self.transient, self.bytes_received):
            try:
                gauge.remove(worker_id, role)
            except KeyError:
                pass  # it never reported stats

    def lease_ended(self, side: str, state: str) -> None:
        self.leases_ended.labels(side, state).inc()

    def request_done(self, trace: dict[str, float]) -> None:
        outcome = "finished" if "finished" in trace else "aborted" if "aborted" in trace else "failed"
        self.requests.labels(outcome).inc()
        if "first_token" in trace:
            self.ttft.observe(trace["first_token"] - trace["queued"])
        if "finished" in trace:
            self.e2e.observe(trace["finished"] - trace["queued"])
        if "transfer_start" in trace and "commit" in trace:
            self.handoff.observe(max(0.0, trace["commit"] - trace["transfer_start"]))
        if "transfer_start" in trace and "transfer_end" in trace:
            self.transfer.observe(max(0.0, trace["transfer_end"] - trace["transfer_start"]))
        if "transfer_end" in trace and "commit" in trace:
            self.conversion.observe(max(0.0, trace["commit"] - trace["transfer_end"]))

    def observe_itl(self, mean_gap: float) -> None:
        self.itl.observe(mean_gap)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
