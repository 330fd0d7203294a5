"""The worker's side of the queue (sync redis): take, refresh, publish, finish.

Ownership of a request is the consumer group's pending entry: a worker holds
an entry from XREADGROUP (or XAUTOCLAIM) until it XACKs it. `heartbeat`
keeps the idle time of held entries near zero, so only the entries of a dead
(or frozen) worker ever reach `claim_idle_ms` and get claimed by another.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from redis.exceptions import ResponseError

from dexserve.queue.protocol import EVENT_FIELD, GROUP, ErrorCode, REQUEST_FIELD, QueueNames, QueueSettings
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

# KEYS: requests   ARGV: group, consumer, id...
# Refresh (XCLAIM JUSTID, which does not count a delivery) only the entries
# this consumer still owns; never steal back one another worker has claimed.
_HEARTBEAT = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    table.insert(owned, ARGV[i])
  end
end
return owned
"""


@dataclass(frozen=True)
class Entry:
    """One request stream entry held by this worker. `request` is None when
    the payload cannot be decoded (dead-lettered at once)."""

    entry_id: bytes
    request: pb.QueuedRequest | None
    payload: bytes

    @property
    def request_id(self) -> str:
        return self.request.request_id if self.request is not None else self.entry_id.decode()


def _entry(entry_id: bytes, fields) -> Entry:
    if isinstance(fields, list):   # raw reply: [f1, v1, f2, v2, ...]
        fields = dict(zip(fields[::2], fields[1::2]))
    payload = (fields or {}).get(REQUEST_FIELD, b"")
    try:
        req = pb.QueuedRequest.FromString(payload) if payload else None
    except Exception:  # protobuf raises DecodeError and friends
        req = None
    if req is not None and not req.request_id:
        req = None
    return Entry(entry_id, req, payload)


def _stream_event(event: pb.StreamEvent) -> dict:
    return {EVENT_FIELD: event.SerializeToString()}


class WorkerQueue:
    def __init__(self, client: redis.Redis, names: QueueNames, settings: QueueSettings, consumer: str,
                 model_card: str | None = None) -> None:
        """`model_card`: the JSON card of the model this worker serves (`contract.model_card.card_json`),
        published with every heartbeat (see `heartbeat`) so the gateway can compare it."""
        self.redis = client
        self.names = names
        self.settings = settings
        self.consumer = consumer
        self._cursor = b"0-0"
        self.redis.set_response_callback("XAUTOCLAIM", lambda r, **_: r)  # parse both 6.2 and 7 shapes here
        self._heartbeat = client.register_script(_HEARTBEAT)
        self.model_card = model_card

    def ensure_group(self) -> None:
        """Create the group (and stream) if missing, reading from the start so
        entries enqueued before any worker existed are delivered."""
        try:
            self.redis.xgroup_create(self.names.requests, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        try:
            reply = self.redis.xreadgroup(GROUP, self.consumer, {self.names.requests: ">"},
                                          count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return []
        return [_entry(eid, fields) for _s, entries in reply or () for eid, fields in entries]

    def claim_stale(self, count: int) -> list[Entry]:
        """XAUTOCLAIM entries idle past claim_idle_ms. The reply has 2 elements
        on Redis 6.2 and 3 on 7.0 (deleted ids); a deleted entry shows up as a
        nil (6.2) and is acknowledged so it leaves the pending list."""
        try:
            reply = self.redis.execute_command(
                "XAUTOCLAIM", self.names.requests, GROUP, self.consumer,
                self.settings.claim_idle_ms, self._cursor, "COUNT", count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return []
        self._cursor = reply[0]
        out: list[Entry] = []
        gone: list[bytes] = list(reply[2]) if len(reply) > 2 and reply[2] else []
        unnamed = False
        for item in reply[1] or ():
            if not item or item[1] is None:    # 6.2: a deleted entry, claimed but not named
                unnamed = True
                continue
            out.append(_entry(item[0], item[1]))
        if unnamed:
            gone.extend(self._deleted_pending({e.entry_id for e in out}))
        if gone:
            self.redis.xack(self.names.requests, GROUP, *gone)
        return out

    def _deleted_pending(self, known: set[bytes]) -> list[bytes]:
        """Ids this consumer holds whose entries no longer exist (6.2 claims
        them as nil without naming them)."""
        rows = self.redis.xpending_range(self.names.requests, GROUP, "-", "+", 1000, consumername=self.consumer)
        return [r["message_id"] for r in rows
                if r["message_id"] not in known and not self.redis.xrange(self.names.requests, r["message_id"],
                                                                          r["message_id"])]

    def begin_attempt(self, request_id: str) -> int:
        """Count one more delivery of the request; returns the attempt number (1-based)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(self.names.attempts(request_id))
        pipe.expire(self.names.attempts(request_id), self.settings.idempotency_ttl_s)
        return int(pipe.execute()[0])

    def is_cancelled(self, request_id: str) -> bool:
        """The cancel flag is set and its grace period (if any) is over."""
        flag, grace = self.redis.mget([self.names.cancel(request_id), self.names.grace(request_id)])
        return bool(flag) and not grace

    def publish_round(self, events: dict[str, pb.StreamEvent], done: dict[str, bytes],
                      watch: list[str]) -> set[str]:
        """One round trip per round: XADD each request's event (with EXPIRE),
        XACK+XDEL the finished entries, and read the cancel flags of `watch`.
        Returns the ids in `watch` whose cancel flag is set."""
        pipe = self.redis.pipeline(transaction=False)
        for rid, event in events.items():
            key = self.names.tokens(rid)
            pipe.xadd(key, _stream_event(event))
            pipe.expire(key, self.settings.token_ttl_s)
        for rid, entry_id in done.items():
            pipe.xack(self.names.requests, GROUP, entry_id)
            pipe.xdel(self.names.requests, entry_id)
            pipe.delete(self.names.attempts(rid))
        if watch:
            pipe.mget([self.names.cancel(rid) for rid in watch] + [self.names.grace(rid) for rid in watch])
        replies = pipe.execute()
        if not watch:
            return set()
        flags, graces = replies[-1][:len(watch)], replies[-1][len(watch):]
        return {rid for rid, flag, grace in zip(watch, flags, graces) if flag and not grace}

    def dead_letter(self, entry: Entry, attempt: int, message: str) -> None:
        """Move the entry to the dead-letter stream and tell its client why."""
        req = pb.QueuedRequest()
        if entry.request is not None:
            req.CopyFrom(entry.request)
        req.attempt = attempt
        rid = entry.request_id
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.names.dead_letter, {REQUEST_FIELD: req.SerializeToString() or entry.payload,
                                           b"reason": message.encode()},
                  maxlen=self.settings.dead_maxlen, approximate=True)
        error = pb.StreamEvent(attempt=attempt, commit_unix_nanos=time.time_ns(),
                               error=pb.ErrorMessage(code=ErrorCode.ABORTED, message=message))
        pipe.xadd(self.names.tokens(rid), _stream_event(error))
        pipe.expire(self.names.tokens(rid), self.settings.token_ttl_s)
        pipe.xack(self.names.requests, GROUP, entry.entry_id)
        pipe.xdel(self.names.requests, entry.entry_id)
        pipe.delete(self.names.attempts(rid))
        pipe.execute()

    def fail(self, entry: Entry, code: ErrorCode, message: str) -> None:
        """Finish a request with an error its client sees (e.g. the engine
        rejected it): publish, then acknowledge."""
        rid = entry.request_id
        event = pb.StreamEvent(commit_unix_nanos=time.time_ns(), error=pb.ErrorMessage(code=code, message=message))
        self.publish_round({rid: event}, {rid: entry.entry_id}, [])

    def hand_back(self, entry: Entry) -> None:
        """Re-queue an entry this worker will not finish (shutdown grace
        expired): a fresh copy goes to the stream's end for any worker, the held
        one is acknowledged, and the hand-back does not count as a failed attempt."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.names.requests, {REQUEST_FIELD: entry.payload})
        pipe.xack(self.names.requests, GROUP, entry.entry_id)
        pipe.xdel(self.names.requests, entry.entry_id)
        pipe.decr(self.names.attempts(entry.request_id))
        pipe.execute()

    def heartbeat(self, entry_ids: list[bytes]) -> set[bytes]:
        """Mark this worker alive and refresh its entries; returns the ids it
        still owns (an entry missing from the answer was claimed by another)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.names.worker(self.consumer), str(time.time()), ex=self.settings.heartbeat_ttl_s)
        if self.model_card is not None:
            pipe.set(self.names.model_card(), self.model_card, ex=self.settings.heartbeat_ttl_s)
        pipe.execute()
        if not entry_ids:
            return set()
        try:
            owned = self._heartbeat(keys=[self.names.requests], args=[GROUP, self.consumer, *entry_ids])
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group is gone: Redis came back without its data (no AOF). Nothing is held any more;
            # the gateway tells the clients their requests were lost, and they send them again.
            log.warning("the consumer group is gone (Redis lost its data): dropping %d held entries", len(entry_ids))
            return set()
        return set(owned)

    def leave(self) -> None:
        self.redis.delete(self.names.worker(self.consumer))
