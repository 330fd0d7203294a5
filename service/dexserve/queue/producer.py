"""The gateway's side of the queue (redis.asyncio): submit, follow, release.

`submit` is one Lua script so that idempotent attach, the length check
(backpressure) and the XADD happen atomically: two retries with the same id
can never both enqueue, and the stream never grows past `maxlen`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from dexserve.queue.codec import fingerprint
from dexserve.queue.protocol import EVENT_FIELD, RECONNECT_BACKOFF_S, REQUEST_FIELD, TRANSIENT, QueueNames, QueueSettings
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

# KEYS: requests, idem, subs, cancel, grace   ARGV: maxlen, payload, fingerprint, ttl, field
# Attaching within a left request's grace period revives it (deletes the pending cancel).
_SUBMIT = """
local prev = redis.call('GET', KEYS[2])
if prev then
  if prev ~= ARGV[3] then return {'conflict', ''} end
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  if redis.call('DEL', KEYS[5]) == 1 then redis.call('DEL', KEYS[4]) end
  return {'attached', ''}
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {'full', ''} end
redis.call('DEL', KEYS[4], KEYS[5])   -- a fresh request: no flag left by an earlier one with this id applies
local id = redis.call('XADD', KEYS[1], '*', ARGV[5], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('SET', KEYS[3], 1, 'EX', ARGV[4])
return {'enqueued', id}
"""

# KEYS: subs, cancel, grace   ARGV: cancel_ttl, cancel(0/1), grace_ms
# The last client to leave an unfinished request cancels it (after grace_ms, unless one re-attaches
# first); others just detach.
_RELEASE = """
local n = redis.call('DECR', KEYS[1])
if n <= 0 and ARGV[2] == '1' then
  if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[3], '1', 'PX', ARGV[3]) end
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
  return 1
end
return 0
"""

__all__ = ["TRANSIENT", "IdConflict", "QueueFull", "RequestLost", "RequestQueue", "Submitted"]


class Submitted(enum.Enum):
    ENQUEUED = "enqueued"
    ATTACHED = "attached"


class QueueFull(Exception):
    """The request stream holds `maxlen` entries: answer RESOURCE_EXHAUSTED."""


class IdConflict(Exception):
    """The request id is in use by a request with a different body."""


class RequestLost(Exception):
    """The request is no longer in Redis (its idempotency key is gone: Redis restarted without its
    data, or was flushed): nobody will ever publish its tokens. The client must send it again."""


class RequestQueue:
    def __init__(self, redis: aioredis.Redis, names: QueueNames, settings: QueueSettings,
                 block_ms: int = 2000) -> None:
        """`block_ms`: how long one XREAD of a token stream waits; keep it below the
        client's socket timeout, or an idle stream times out its own connection."""
        self.redis = redis
        self.block_ms = block_ms
        self.names = names
        self.settings = settings
        self._submit = redis.register_script(_SUBMIT)
        self._release = redis.register_script(_RELEASE)

    async def submit(self, qreq: pb.QueuedRequest) -> Submitted:
        rid = qreq.request_id
        status, _ = await self._submit(
            keys=[self.names.requests, self.names.idempotency(rid), self.names.subscribers(rid),
                  self.names.cancel(rid), self.names.grace(rid)],
            args=[self.settings.maxlen, qreq.SerializeToString(), fingerprint(qreq.request),
                  self.settings.idempotency_ttl_s, REQUEST_FIELD])
        status = status.decode() if isinstance(status, bytes) else status
        if status == "full":
            raise QueueFull(f"request queue is full ({self.settings.maxlen} entries)")
        if status == "conflict":
            raise IdConflict(f"request_id {rid!r} is in use by a different request")
        return Submitted(status)

    async def events(self, request_id: str, stopped: Callable[[], bool] = lambda: False,
                     ) -> AsyncIterator[tuple[bytes, pb.StreamEvent]]:
        """Every event of the request's token stream from the start, as soon as
        it is written (XREAD BLOCK). Survives Redis restarts by reconnecting and
        resuming after the last id seen; ends when the caller stops, or at the end
        of the blocking read (at most `block_ms`) during which `stopped()` turned true.

        Every `block_ms` while following, and at once after a lost connection, it renews the request's
        idempotency key (EXPIRE: the request stays attachable while a client follows it); a key that
        is gone means the request is gone (a Redis that came back without its data): `RequestLost`,
        instead of waiting for tokens nobody will publish."""
        key = self.names.tokens(request_id)
        idem = self.names.idempotency(request_id)
        last = b"0-0"
        first, largest = RECONNECT_BACKOFF_S
        backoff = first
        loop = asyncio.get_running_loop()
        check_at = loop.time() + self.block_ms / 1000
        while not stopped():
            try:
                if loop.time() >= check_at:
                    if not await self.redis.expire(idem, self.settings.idempotency_ttl_s):
                        raise RequestLost(f"request {request_id} was lost by the queue (Redis lost its data: "
                                          f"restarted without persistence, or flushed); send it again")
                    check_at = loop.time() + self.block_ms / 1000
                reply = await self.redis.xread({key: last}, count=256, block=self.block_ms)
                backoff = first
            except TRANSIENT as exc:
                log.warning("token stream %s: %s; retrying", key, exc)
                check_at = 0.0      # reconnected: first make sure the request survived the outage
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, largest)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    yield entry_id, pb.StreamEvent.FromString(fields[EVENT_FIELD])

    async def release(self, request_id: str, cancel: bool, grace: bool = True) -> bool:
        """Detach one client; with `cancel`, the last one out sets the cancel flag, which
        applies after `resume_grace_s` (`grace`) or at once. Returns whether the flag was set."""
        grace_ms = int(self.settings.resume_grace_s * 1000) if grace else 0
        done = await self._release(
            keys=[self.names.subscribers(request_id), self.names.cancel(request_id), self.names.grace(request_id)],
            args=[self.settings.cancel_ttl_s, "1" if cancel else "0", grace_ms])
        return bool(done)

    async def depth(self) -> int:
        return int(await self.redis.xlen(self.names.requests))
