"""Prometheus metrics over HTTP (METER_METRICS_LISTEN): calls by method and status code, and
their latency; the usage export per sink (events delivered, retried, dead; lag in events and
seconds and dead letters held, refreshed every EXPORT_STATUS_EVERY_S by the exporter). Off
unless configured, so the request path pays nothing by default."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._http: Any = None
        self.calls = Counter(
            "meter_grpc_calls_total",
            "Completed gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "meter_grpc_call_seconds",
            "Time from receiving a call to answering it.",
            ["method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )

        self.export_events = Counter(
            "meter_grpc_export_events_total",
            "Usage events handed to an export sink, by what it answered (delivered, retry, dead).",
            ["sink", "outcome"],
            registry=self.registry,
        )
        self.export_lag_events = Gauge(
            "meter_grpc_export_lag_events",
            "Counted changes a sink has not acknowledged yet (every outbox stream).",
            ["sink"],
            registry=self.registry,
        )
        self.export_lag_seconds = Gauge(
            "meter_grpc_export_lag_seconds",
            "Age of the oldest change a sink has not acknowledged yet.",
            ["sink"],
            registry=self.registry,
        )
        self.export_dead_letters = Gauge(
            "meter_grpc_export_dead_letters",
            "Dead letters held for a sink (events it refused for good).",
            ["sink"],
            registry=self.registry,
        )

    def export_outcomes(self, sink: str, delivered: int, retried: int, dead: int) -> None:
        for outcome, n in (("delivered", delivered), ("retry", retried), ("dead", dead)):
            if n:
                self.export_events.labels(sink, outcome).inc(n)

    def export_status(self, sink: str, lag_events: int, lag_s: float, dead: int) -> None:
        self.export_lag_events.labels(sink).set(lag_events)
        self.export_lag_seconds.labels(sink).set(lag_s)
        self.export_dead_letters.labels(sink).set(dead)

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.calls.labels(name, code).inc()
        self.latency.labels(name).observe(seconds)

    def serve(self, listen: str) -> int:
        """Starts the HTTP endpoint (a thread); returns its port."""
        host, _, port = listen.rpartition(":")
        self._http, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry
        )
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
