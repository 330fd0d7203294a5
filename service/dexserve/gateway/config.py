"""The gateway's settings: one typed object, built from flags and environment
only at the CLI edge (`dexserve.commands.gateway`); tests build it directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from dexserve.contract.limits import Limits
from dexserve.queue.protocol import QueueNames, QueueSettings


@dataclass
class GatewayConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 50051                      # 0 = any free port
    http_port: int | None = None           # the OpenAI-compatible HTTP door; None = off, 0 = any free port
    model: str | None = None               # checkpoint dir; None = the shipped model
    limits: Limits = field(default_factory=Limits)   # the workers build theirs from the same flags/env
    auth_token: str | None = None
    tls_cert: str | None = None            # TLS for both doors (gRPC and HTTP)
    tls_key: str | None = None
    names: QueueNames = field(default_factory=QueueNames)
    settings: QueueSettings = field(default_factory=QueueSettings)
    # Compare with the card the workers publish (QueueNames.model_card): `dex gateway` turns it on
    # (--no-model-card-check turns it off); in-process gateways in tests opt in.
    check_model_card: bool = False
    # A differing card at start may be the old workers' during a rollout: re-read it this long
    # before refusing to start (the new workers publish theirs once their model has loaded).
    model_card_wait_s: float = 0.0
    # No live worker (no model card in Redis): refuse with UNAVAILABLE / 503 instead of queueing. Off by
    # default: workers may be scaled to zero and woken by the queue (the chart's KEDA trigger).
    require_workers: bool = False
