"""Prometheus metrics of the follower (`vtap follow --metrics-port PORT`)."""

from __future__ import annotations

from vtap_core.errors import OperationFailed


class PrometheusMetrics:
    """Flows desired and active, follow latency, reconnects, errors; served over HTTP."""

    def __init__(self, port: int, driver: str, addr: str = "127.0.0.1"):
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise OperationFailed("--metrics-port needs the Python package prometheus-client") from exc
        self.registry = prom.CollectorRegistry()
        labels = {"driver": driver}
        self.flows_desired = prom.Gauge("vtap_bindings_desired", "platform objects vtap should keep", ["driver"], registry=self.registry).labels(**labels)
        self.flows_active = prom.Gauge("vtap_bindings_active", "platform objects found in place", ["driver"], registry=self.registry).labels(**labels)
        self.latency = prom.Histogram(
            "vtap_follow_latency_seconds",
            "from an event hint to its reconcile being done",
            ["driver"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        ).labels(**labels)
        self.reconnects = prom.Counter("vtap_reconnects", "connections to the platform re-established", ["driver"], registry=self.registry).labels(**labels)
        self.errors = prom.Counter("vtap_errors", "failed reconciles and watch errors", ["driver"], registry=self.registry).labels(**labels)
        prom.start_http_server(port, addr=addr, registry=self.registry)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def count_reconnect(self) -> None:
        self.reconnects.inc()

    def count_error(self) -> None:
        self.errors.inc()

    def set_flows(self, desired: int, active: int) -> None:
        self.flows_desired.set(desired)
        self.flows_active.set(active)
