"""Telemetry of one process, started by `dex gateway` and `dex worker`.

Keeps the commands' edits to a few lines: start (from the `TelemetrySettings`
the command built from its flags), hand the observer to the object the
command builds, mark ready, shut down (flushing the last spans).
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics

from dexserve.contract.engine import Engine
from dexserve.queue.protocol import QueueNames
from dexserve.telemetry import tracing
from dexserve.telemetry.endpoint import MetricsServer
from dexserve.telemetry.settings import TelemetrySettings

log = logging.getLogger(__name__)


class ProcessTelemetry:
    def __init__(self, settings: TelemetrySettings, registry: CollectorRegistry = REGISTRY) -> None:
        disable_created_metrics()     # `*_created` series double the count and no dashboard reads them
        self.registry = registry
        self.provider = tracing.setup_tracing(settings.tracing)
        self.tracer = tracing.get_tracer(self.provider)
        port = settings.metrics_port
        self.server = MetricsServer(port, settings.metrics_host, registry).start() if port is not None else None
        self._observers: list = []

    def set_ready(self, ready: bool = True) -> None:
        """/healthz answers 200 from now on (503 before)."""
        if self.server is not None:
            self.server.set_ready(ready)

    def shutdown(self) -> None:
        for obs in self._observers:
            close = getattr(obs, "close", None)
            if close is not None:
                close()
        tracing.shutdown_tracing(self.provider)
        if self.server is not None:
            self.server.stop()


def start_worker_telemetry(settings: TelemetrySettings) -> "WorkerProcessTelemetry":
    return WorkerProcessTelemetry(settings)


class WorkerProcessTelemetry(ProcessTelemetry):
    """Started before the model loads, so /healthz reads 503 while it does."""

    def __init__(self, settings: TelemetrySettings, registry: CollectorRegistry = REGISTRY) -> None:
        from dexserve.telemetry.metrics import WorkerMetrics

        super().__init__(settings, registry)
        self.metrics = WorkerMetrics(registry)

    def observer(self, engine: Engine, names: QueueNames):
        from dexserve.telemetry.worker_observer import WorkerTelemetry

        obs = WorkerTelemetry.for_engine(engine.info, self.tracer, self.metrics, names)
        self._observers.append(obs)
        return obs

    def set_ready(self, ready: bool = True) -> None:
        super().set_ready(ready)
        self.metrics.ready.set(1 if ready else 0)


class GatewayProcessTelemetry(ProcessTelemetry):
    """Also samples the queue (depth, lag, oldest wait, live workers) at scrape time."""

    def __init__(self, settings: TelemetrySettings, redis_url: str, names,
                 registry: CollectorRegistry = REGISTRY) -> None:
        import redis

        from dexserve.telemetry.gateway_observer import GatewayTelemetry
        from dexserve.telemetry.metrics import GatewayMetrics, QueueCollector

        super().__init__(settings, registry)
        self.metrics = GatewayMetrics(registry)
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._queue = QueueCollector(self._redis, names)
        registry.register(self._queue)
        self.observer = GatewayTelemetry(self.tracer, self.metrics, names)

    def shutdown(self) -> None:
        super().shutdown()
        try:
            self.registry.unregister(self._queue)
        except KeyError:
            pass
        self._redis.close()


def start_gateway_telemetry(config, settings: TelemetrySettings) -> GatewayProcessTelemetry:
    return GatewayProcessTelemetry(settings, config.redis_url, config.names)
