"""Names and timings of the queue protocol: the one home both sides import.

Keys (prefix `dex` by default; tests use a prefix of their own):

- `dex:requests`             Stream of QueuedRequest (field `m`), read by group `dex-workers`.
- `dex:tokens:<id>`          Stream of StreamEvent (field `e`) for one request; EXPIRE token_ttl.
- `dex:cancel:<id>`          String flag set by the gateway; checked by the worker every round.
- `dex:grace:<id>`           Set (PX resume_grace) with the cancel flag when the last client left early:
                             while it lives the worker keeps running the request, and a client that
                             re-attaches (same id and body) deletes both; once it expires the flag applies.
- `dex:idem:<id>`            Fingerprint of the request holding that id (idempotent attach); renewed
                             while a gateway follows the request, so its absence means Redis lost it.
- `dex:subs:<id>`            Number of clients attached to the request's token stream.
- `dex:attempts:<id>`        Deliveries started so far (INCR per start); > max_attempts → dead letter.
- `dex:dead`                 Stream of dead-lettered QueuedRequests (attempt set), MAXLEN ~ dead_maxlen.
- `dex:worker:<consumer>`    Heartbeat key of a live worker, EXPIRE heartbeat_ttl.
- `dex:model-card`           JSON summary of the model the live workers serve (`contract.model_card.card_summary`
                             plus its `fingerprint`): SET by every worker at start and with every heartbeat,
                             EXPIRE heartbeat_ttl (no worker running: no card). The gateway compares its own
                             at start and on every health tick.

Only Redis 6.2 commands are used (XAUTOCLAIM, exclusive XRANGE ranges,
XADD MAXLEN); nothing reads XINFO's `lag` (7.0+). Workers XACK *and* XDEL every
finished entry, so XLEN of the request stream is exactly queued + in flight on
every Redis version: the autoscaling signal (KEDA `streamLength`; see
`dexserve.queue.lag.backlog`). XINFO GROUPS `lag` is wrong or null after XDEL
before Redis 7.4.2 and is not used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

GROUP = "dex-workers"
REQUEST_FIELD = b"m"
EVENT_FIELD = b"e"


class ErrorCode(enum.IntEnum):
    """The status codes a worker puts in a stream's error event: gRPC's own
    numbers (`grpc.StatusCode`), so the gateway forwards them unchanged."""

    INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]   # the engine refused the request
    ABORTED = grpc.StatusCode.ABORTED.value[0]                     # dead-lettered after max_attempts
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]             # the engine failed while decoding it


# Errors that mean "Redis is not reachable right now" (restart, failover, network, still loading
# its AOF: BusyLoadingError is a ConnectionError): callers retry with backoff; anything else is a bug.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
RECONNECT_BACKOFF_S = (0.05, 2.0)      # first and largest wait between tries while Redis is unreachable


# Trailing metadata on a call that ended because its *request* ended (an error event from the
# worker): re-attaching would replay the same end, so clients do not retry it.
FINAL_METADATA = ("dex-final", "1")
# What a client does on UNAVAILABLE without FINAL_METADATA (gateway draining, connection lost,
# Redis down at submit): reconnect with the same request_id and resume_from, this many times.
CLIENT_RETRIES = 6
CLIENT_BACKOFF_S = (0.2, 3.0)


STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def consumer_name(host: str, pid: int) -> str:
    """A worker's consumer name in the group: `<host>-<pid>` (unique per live
    process; `dex up` finds its own workers by the host prefix)."""
    return f"{host}-{pid}"


def consumer_host_prefix(host: str) -> str:
    return consumer_name(host, 0)[:-1]


@dataclass(frozen=True)
class QueueNames:
    prefix: str = "dex"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    def tokens(self, request_id: str) -> str:
        return f"{self.prefix}:tokens:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    def grace(self, request_id: str) -> str:
        """Present while a request whose last client left may still be resumed (see `cancel`)."""
        return f"{self.prefix}:grace:{request_id}"

    def idempotency(self, request_id: str) -> str:
        return f"{self.prefix}:idem:{request_id}"

    def subscribers(self, request_id: str) -> str:
        return f"{self.prefix}:subs:{request_id}"

    def attempts(self, request_id: str) -> str:
        return f"{self.prefix}:attempts:{request_id}"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def model_card(self) -> str:
        """The served model's card summary (JSON), published by workers, checked by the gateway."""
        return f"{self.prefix}:model-card"


# A live worker's held entries are refreshed at least this many times before they may be claimed:
# a heartbeat or two lost to a slow Redis round trip or a busy CPU never makes a live worker look dead.
HEARTBEATS_PER_CLAIM = 3


@dataclass(frozen=True)
class QueueSettings:
    """Timings and bounds. The invariant that matters: a live worker refreshes the idle time of
    what it holds (its heartbeat thread, every heartbeat_interval_s) at least HEARTBEATS_PER_CLAIM
    times within claim_idle_ms, so only a dead (or frozen) worker's entries are ever claimed.

    Recovery of a killed worker's request takes claim_idle_ms + at most claim_interval_ms (the
    survivors' XAUTOCLAIM scan) + the restart of the request on the survivor."""

    maxlen: int = 1000                 # request stream entries (queued + in flight) before RESOURCE_EXHAUSTED
    token_ttl_s: int = 600             # a token stream outlives its request by this much (late attach, replay)
    idempotency_ttl_s: int = 600       # how long a request id stays attachable
    cancel_ttl_s: int = 600
    claim_idle_ms: int = 3_000         # an entry idle this long belongs to a dead worker
    claim_interval_ms: int = 500       # how often a worker with a free slot scans for such entries (XAUTOCLAIM)
    heartbeat_interval_s: float = 0.5  # the heartbeat thread: worker key, model card, idle time of held entries
    heartbeat_ttl_s: int = 10
    max_attempts: int = 3              # deliveries before a request is dead-lettered
    dead_maxlen: int = 10_000
    # A request whose last client left early keeps running this long, so that the client (or its
    # retry through another gateway) can re-attach and resume; then it is cancelled. 0: at once.
    resume_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or \
                self.heartbeat_interval_s * 1000 * HEARTBEATS_PER_CLAIM > self.claim_idle_ms:
            raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be positive and at most "
                             f"claim_idle_ms / {HEARTBEATS_PER_CLAIM} ({self.claim_idle_ms} ms / "
                             f"{HEARTBEATS_PER_CLAIM}): a live worker must never look dead")
        if self.claim_interval_ms <= 0:
            raise ValueError(f"claim_interval_ms ({self.claim_interval_ms}) must be positive")
        if self.resume_grace_s < 0:
            raise ValueError("resume_grace_s must be >= 0")
        if self.max_attempts < 1 or self.maxlen < 1:
            raise ValueError("max_attempts and maxlen must be positive")
