"""Consumer-group lag without XINFO's `lag` field (Redis 7 only).

Lag = entries after the group's last-delivered-id, counted with an exclusive
XRANGE (6.2+). This is what `dex up --min/max-workers` scales on and what an
external autoscaler can read the same way.
"""

from __future__ import annotations

import redis
from redis.exceptions import ResponseError

from dexserve.queue.protocol import GROUP, QueueNames


def group_lag(client: redis.Redis, names: QueueNames, cap: int = 10_000) -> int:
    """Undelivered entries (capped at `cap`); the whole stream if no group yet."""
    try:
        groups = client.xinfo_groups(names.requests)
    except ResponseError:  # no such key
        return 0
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == GROUP:
            last = g.get("last-delivered-id")
            last = last.decode() if isinstance(last, bytes) else last
            return len(client.xrange(names.requests, min=f"({last}", max="+", count=cap))
    return min(int(client.xlen(names.requests)), cap)


def pending(client: redis.Redis, names: QueueNames) -> int:
    """Entries delivered but not yet acknowledged (held by workers)."""
    try:
        return int(client.xpending(names.requests, GROUP)["pending"])
    except ResponseError:
        return 0


def backlog(client: redis.Redis, names: QueueNames) -> int:
    """Queued + in-flight requests: XLEN of the request stream. Exact on every Redis
    version because workers XDEL every entry they finish (see protocol.py); this is the
    number the chart's KEDA trigger (`streamLength`) scales on."""
    return int(client.xlen(names.requests))
