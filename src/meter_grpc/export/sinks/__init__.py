"""The billing systems usage is exported to, each on when its METER_EXPORT_* variables are set:
Lago (`lago.py`), m3ter (`m3ter.py`), OpenMeter (`openmeter.py`), Stripe Meters
(`stripe.py`). `_http.py` holds what they share: the session, the reading of answers into
outcomes (the table there), and the isolation of bad events in a refused batch. The NDJSON
sink (`ndjson.py`, METER_EXPORT_NDJSON) has its own factory, `ndjson.build_ndjson`; the
exporter takes both (export/exporter.py `sinks_of`)."""

from __future__ import annotations

from meter_grpc.config import Settings
from meter_grpc.export.model import Sink
from meter_grpc.export.sinks.lago import LagoSink
from meter_grpc.export.sinks.m3ter import M3terSink
from meter_grpc.export.sinks.openmeter import OpenMeterSink
from meter_grpc.export.sinks.stripe import StripeSink

__all__ = ["LagoSink", "M3terSink", "OpenMeterSink", "StripeSink", "build_sinks"]


def build_sinks(settings: Settings) -> list[Sink]:
    """The HTTP sinks the settings turn on (none by default), in this order: lago, m3ter,
    openmeter, stripe. Each opens its HTTP session on first use; close() each at the end."""
    timeout_s, clock = settings.export_http_timeout_s, settings.clock
    sinks: list[Sink] = []
    if settings.export_lago is not None:
        sinks.append(LagoSink(settings.export_lago, timeout_s=timeout_s, clock=clock))
    if settings.export_m3ter is not None:
        sinks.append(M3terSink(settings.export_m3ter, timeout_s=timeout_s, clock=clock))
    if settings.export_openmeter is not None:
        sinks.append(OpenMeterSink(settings.export_openmeter, timeout_s=timeout_s, clock=clock))
    if settings.export_stripe is not None:
        sinks.append(StripeSink(settings.export_stripe, timeout_s=timeout_s, clock=clock))
    return sinks
