"""A worker process's settings: one typed object, built from flags and
environment only at the CLI edge (`dexserve.launch.worker`); tests build it
directly. Nothing here imports torch: a worker running the stand-in never
loads it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from dexserve.commands.options import DEFAULT_REDIS_URL
from dexserve.engine.config import EngineConfig
from dexserve.kube.pod_guard import PodRef
from dexserve.queue.protocol import QueueNames, QueueSettings, consumer_name
from dexserve.telemetry.endpoint import WORKER_METRICS_PORT
from dexserve.telemetry.settings import TelemetrySettings, TracingSettings
from dexserve.telemetry.tracing import WORKER_SERVICE

EngineKind = Literal["dex", "standin"]


@dataclass(frozen=True)
class StandinOptions:
    """The stand-in engine (commits a hash of the prompt instantly; for tests and service benchmarks)."""

    delay_s: float = 0.0            # seconds per round
    poison: str | None = None       # prompts containing this fail inside the engine
    logprobs: bool = True           # False: reports no log-probabilities (an engine without them)


@dataclass
class WorkerSettings:
    model: str | None = None                          # checkpoint dir; None = the shipped model
    engine: EngineKind = "dex"
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    standin: StandinOptions = field(default_factory=StandinOptions)
    redis_url: str = DEFAULT_REDIS_URL
    names: QueueNames = field(default_factory=QueueNames)
    queue: QueueSettings = field(default_factory=QueueSettings)
    consumer: str = field(default_factory=lambda: consumer_name(socket.gethostname(), os.getpid()))
    grace_s: float = 30.0                              # after SIGTERM: finish held requests, then hand back
    log_level: str = "INFO"
    telemetry: TelemetrySettings = field(default_factory=lambda: TelemetrySettings(
        TracingSettings(WORKER_SERVICE), metrics_port=WORKER_METRICS_PORT))   # spans off; metrics on :9465
    pod: PodRef = field(default_factory=PodRef)        # the pod to guard from scale-down while busy (none outside k8s)
