"""Prometheus metrics over HTTP (METER_METRICS_LISTEN): calls by method and status code, and
their latency. Off unless configured, so the request path pays nothing by default."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

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
