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
    # Open Generate/Complete calls this gateway serves at once; one more is RESOURCE_EXHAUSTED.
    # Every open call holds one Redis connection (a blocking XREAD), so the connection pool
    # is sized from this number (`redis_pool_size`), never the other way round.
    max_streams: int = 1000
    # Socket timeout of the gateway's Redis connections; the blocking read of a token stream
    # waits half of it, so an idle stream never times out its own connection.
    redis_socket_timeout_s: float = 10.0
    # No live worker (no model card in Redis): refuse with UNAVAILABLE / 503 instead of queueing. Off by
    # default: workers may be scaled to zero and woken by the queue (the chart's KEDA trigger).
    require_workers: bool = False

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {self.max_streams}")
        if self.redis_socket_timeout_s <= 0.1:
            raise ValueError(f"redis_socket_timeout_s must be above 0.1 s, got {self.redis_socket_timeout_s}")

    @property
    def redis_pool_size(self) -> int:
        """One connection per open call plus a few for the health loop and short commands."""
        return self.max_streams + POOL_HEADROOM

    @property
    def stream_block_ms(self) -> int:
        """XREAD BLOCK of a token stream: half the socket timeout."""
        return int(self.redis_socket_timeout_s * 500)


POOL_HEADROOM = 8
