"""A process's telemetry settings: typed objects, built from flags and environment only
at the CLI edge (`dexserve.commands.options.add_telemetry_arguments`, used by `dex gateway`
and `dex worker`); tests and benchmarks build them directly.

The standard OpenTelemetry variables keep working: the edge turns the ones dexserve
decides with (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `..._PROTOCOL`, `OTEL_SERVICE_NAME`,
`OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`, `OTEL_SPAN_EVENT_COUNT_LIMIT`) into flag defaults;
the rest (headers, certificates, sampler, resource attributes, batch-processor timings)
the OpenTelemetry SDK reads itself, at its own edge.
"""

from __future__ import annotations

from dataclasses import dataclass

# A request commits one token per event and collapses about as often: the SDK's
# default of 128 events per span would drop most of a long request's rounds.
DEFAULT_MAX_EVENTS = 8192
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_METRICS_HOST = "0.0.0.0"


@dataclass(frozen=True)
class TracingSettings:
    """How a process exports spans."""

    service_name: str                      # the resource's service.name (dexserve-gateway / dexserve-worker)
    endpoint: str | None = None            # OTLP collector, e.g. http://otel-collector:4317; None: no SDK, no spans
    protocol: str = "grpc"                 # grpc | http/protobuf
    max_events: int = DEFAULT_MAX_EVENTS   # events kept per span (a commit and a collapse per token)

    def __post_init__(self) -> None:
        if self.protocol not in OTLP_PROTOCOLS:
            raise ValueError(f"otlp protocol: one of {', '.join(OTLP_PROTOCOLS)}, got {self.protocol!r}")
        if self.max_events < 1:
            raise ValueError(f"span event limit: at least 1, got {self.max_events}")

    @property
    def exporting(self) -> bool:
        return bool(self.endpoint)


@dataclass(frozen=True)
class TelemetrySettings:
    """Tracing, and the metrics port (`/metrics` for Prometheus, `/healthz` for probes)."""

    tracing: TracingSettings
    metrics_port: int | None = None        # None: no metrics endpoint; 0: any free port
    metrics_host: str = DEFAULT_METRICS_HOST

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port: 0..65535 or off, got {self.metrics_port}")
