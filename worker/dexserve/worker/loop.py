"""The worker loop: maps queue entries to engine requests and rounds to events.

Per iteration: take work while the engine has a free slot (stale claims
first, then new entries), run one `engine.step()` over everything held,
publish that round's tokens in one pipeline together with acks of finished
entries and a read of the held requests' cancel flags, and cancel the
flagged ones before the next round. A heartbeat thread keeps held entries
fresh -- from the moment they are read, through a long `engine.add` (prefill,
a first-use compile) and every round -- independently of how long the loop's
own calls take; an entry another worker claimed from us is dropped without
publishing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from dexserve.contract.engine import Engine
from dexserve.contract.observer import WorkerObserver
from dexserve.contract.request import EngineFailure, Finished, FinishReason, InvalidRequest
from dexserve.contract.validation import validate_capabilities
from dexserve.queue.codec import finish_message, to_generation_request, token_messages
from dexserve.queue.consumer import Entry, WorkerQueue
from dexserve.queue.protocol import RECONNECT_BACKOFF_S, TRANSIENT, ErrorCode
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 200


class _NoGuard:
    def mark_busy(self) -> None: ...
    def mark_idle(self) -> None: ...


def default_pod_guard(pod=None):
    """PodGuard (dexserve.kube.pod_guard) protects a busy pod (`pod`: the settings' `PodRef`)
    from scale-down; outside Kubernetes, or before that module exists, a no-op."""
    if pod is None:
        return _NoGuard()
    try:
        from dexserve.kube.pod_guard import PodGuard
    except ImportError:
        return _NoGuard()
    try:
        return PodGuard.for_pod(pod)
    except Exception:  # a guard that cannot start must not stop the worker
        log.exception("PodGuard unavailable; continuing without it")
        return _NoGuard()


@dataclass
class Held:
    entry: Entry
    attempt: int
    started: float
    rounds: int = 0          # engine rounds this request took part in (its usage's `dex.rounds`)


class Worker:
    def __init__(self, engine: Engine, queue: WorkerQueue, observer: WorkerObserver | None = None,
                 pod_guard=None, grace_s: float = 30.0) -> None:
        self.engine = engine
        self.queue = queue
        self.settings = queue.settings
        self.observer = observer or WorkerObserver()
        self.pod_guard = pod_guard or _NoGuard()
        self.grace_s = grace_s
        self.held: dict[str, Held] = {}
        self._lock = threading.Lock()          # guards `held` against the heartbeat thread's snapshot
        self._lost: set[bytes] = set()
        self._taking: set[bytes] = set()         # read or claimed, not yet in `held` (engine.add may take long)
        self._last_beat = time.monotonic()       # the heartbeat thread's last successful refresh
        self._stop = threading.Event()           # no new work
        self._exit = threading.Event()           # the loop has ended: heartbeats stop
        self._stop_deadline: float | None = None
        self._next_claim = 0.0
        self._backoff = RECONNECT_BACKOFF_S[0]
        self._down_since: float | None = None

    # ---- Redis outages ---------------------------------------------------
    def _redis_down(self, exc: BaseException) -> None:
        """Redis is unreachable (restart, failover): wait with backoff and try again; never exit.
        What is held stays held (its entries are pending in the group, which AOF keeps)."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unavailable (%s); reconnecting with backoff", exc)
        time.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_S[1])

    def _redis_ok(self) -> None:
        if self._down_since is not None:
            log.warning("redis reachable again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
            # Every live worker's entries aged while Redis was away: give their owners' heartbeats a
            # full claim period to refresh them before claiming anything, so only a dead worker's go.
            self._next_claim = time.monotonic() + self.settings.claim_idle_ms / 1000
        self._backoff = RECONNECT_BACKOFF_S[0]

    def _publish(self, events: dict[str, pb.StreamEvent], done: dict[str, bytes], watch: list[str]) -> set[str]:
        """publish_round, retried until Redis takes it: a round's tokens are committed in the
        engine already, so the next round must not run before they are published (a gap would
        stall the stream). A retry after a partial write repeats events, which the gateway skips."""
        return self._retrying(lambda: self.queue.publish_round(events, done, watch))

    def _retrying(self, write):
        """Run a queue write that must not be lost (the engine's state already moved on) until
        Redis takes it; gives up only when a stop's grace period has run out."""
        while True:
            try:
                out = write()
                self._redis_ok()
                return out
            except TRANSIENT as exc:
                if self._stop.is_set() and time.monotonic() >= (self._stop_deadline or 0):
                    raise
                self._redis_down(exc)

    # ---- lifecycle -------------------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM: take no new work; finish what is held within the grace period."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + self.grace_s
            self._stop.set()

    def run(self) -> int:
        self._retrying(self.queue.ensure_group)
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        try:
            while True:
                if self._stop.is_set():
                    if not self.held or time.monotonic() >= (self._stop_deadline or 0):
                        break
                try:
                    if not self._stop.is_set():
                        self._take()
                    self._drop_lost()
                    if self.engine.active:
                        self._round()
                    self._redis_ok()
                except TRANSIENT as exc:
                    self._redis_down(exc)
        finally:
            self._hand_back_all()
            self._exit.set()
            beat.join(timeout=2)
            try:
                self.queue.leave()
            except TRANSIENT as exc:     # Redis still down: the heartbeat key expires by itself
                log.warning("could not remove the heartbeat key: %s", exc)
        return 0

    # ---- taking work -----------------------------------------------------
    def _take(self) -> None:
        now = time.monotonic()
        if now >= self._next_claim and self.engine.has_capacity():
            self._next_claim = now + self.settings.claim_interval_ms / 1000
            entries = self.queue.claim_stale(count=4)
            self._taken(entries)
            for entry in entries:
                self._start(entry, claimed=True)
        while self.engine.has_capacity() and not self._stop.is_set():
            entries = self.queue.read_new(1, None if self.held else min(IDLE_BLOCK_MS, self.settings.claim_interval_ms))
            if not entries:
                return
            self._taken(entries)
            self._start(entries[0], claimed=False)

    def _taken(self, entries: list[Entry]) -> None:
        """Entries just read or claimed: the heartbeat refreshes them from now on (until `_start` ends)."""
        with self._lock:
            self._taking.update(e.entry_id for e in entries)

    def _start(self, entry: Entry, claimed: bool) -> None:
        try:
            self._start_entry(entry, claimed)
        finally:
            with self._lock:
                self._taking.discard(entry.entry_id)

    def _start_entry(self, entry: Entry, claimed: bool) -> None:
        if entry.request is None:
            self.queue.dead_letter(entry, 0, f"undecodable queue entry {entry.entry_id!r}")
            return
        rid = entry.request_id
        if rid in self.held:
            if self.held[rid].entry.entry_id != entry.entry_id:   # a second copy of a request we run
                self.queue.publish_round({}, {rid: entry.entry_id}, [])
            return
        attempt = self.queue.begin_attempt(rid)
        if claimed:
            self.observer.on_claim(rid, attempt)
        if attempt > self.settings.max_attempts:
            msg = f"request {rid} dead-lettered after {attempt - 1} failed attempts"
            log.warning(msg)
            self.queue.dead_letter(entry, attempt - 1, msg)
            self.observer.on_request_failed(rid, ErrorCode.ABORTED, msg)
            return
        req = entry.request
        expired = req.deadline_unix_ms and req.deadline_unix_ms < time.time() * 1000
        if expired or self.queue.is_cancelled(rid):
            self._finish_unstarted(entry, attempt)
            return
        try:
            greq = to_generation_request(req.request)
            validate_capabilities(greq, logprobs=self.engine.info.logprobs)
            self.engine.add(greq)
        except InvalidRequest as exc:
            self.queue.fail(entry, ErrorCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}")
            self.observer.on_request_failed(rid, ErrorCode.INVALID_ARGUMENT, str(exc))
            return
        except Exception:
            # Left pending and (once `_start` returns) not refreshed: claimed again after claim_idle_ms,
            # which counts an attempt, so a request that always fails is dead-lettered.
            log.exception("engine refused %s (attempt %d); leaving it for a retry", rid, attempt)
            return
        with self._lock:
            self.held[rid] = Held(entry, attempt, time.monotonic())
            if len(self.held) == 1:
                self.pod_guard.mark_busy()
        self.observer.on_request_start(req, attempt)

    def _finish_unstarted(self, entry: Entry, attempt: int) -> None:
        fin = Finished(entry.request_id, FinishReason.CANCELLED, 0, 0)
        event = pb.StreamEvent(attempt=attempt, commit_unix_nanos=time.time_ns(), finish=finish_message(fin))
        self.queue.publish_round({entry.request_id: event}, {entry.request_id: entry.entry_id}, [])
        self.observer.on_request_finish(entry.request_id, fin)

    # ---- rounds ----------------------------------------------------------
    def _round(self) -> None:
        try:
            result = self.engine.step()
        except EngineFailure as exc:
            self._engine_failed(exc)
            return
        except Exception as exc:
            # Not the executor (that is EngineFailure): which request caused it is unknown, so every
            # request of the round ends with an error and gives back what it holds in the engine;
            # the worker keeps serving. If even that fails, the engine is broken: exit (and be replaced).
            log.exception("engine step failed")
            self._engine_failed(EngineFailure(f"engine error: {type(exc).__name__}: {exc}", list(self.held)),
                                cancel=True)
            return
        now = time.time_ns()
        for held in self.held.values():      # every request the engine holds takes part in each round
            held.rounds += 1
        events: dict[str, pb.StreamEvent] = {}

        def event(rid: str) -> pb.StreamEvent:
            if rid not in events:
                held = self.held.get(rid)
                events[rid] = pb.StreamEvent(attempt=held.attempt if held else 0, commit_unix_nanos=now)
            return events[rid]

        by_request: dict[str, list] = {}
        for tok in result.tokens:
            by_request.setdefault(tok.request_id, []).append(tok)
        for rid, toks in by_request.items():
            event(rid).tokens.extend(token_messages(toks))
        done: dict[str, bytes] = {}
        for fin in result.finished:
            event(fin.request_id).finish.CopyFrom(finish_message(fin, self._dex_usage(fin.request_id)))
            if fin.request_id in self.held:
                done[fin.request_id] = self.held[fin.request_id].entry.entry_id
        watch = [rid for rid in self.held if rid not in done]
        t0 = time.perf_counter()
        cancelled = self._publish(events, done, watch)
        publish_s = time.perf_counter() - t0
        self.observer.on_round(result.record, result.tokens, result.finished, publish_s)  # before finish: last commit's event
        for fin in result.finished:
            self._release(fin.request_id, fin)
        if cancelled:
            self._cancel(cancelled)

    def _dex_usage(self, rid: str) -> pb.DexUsage | None:
        """How the engine decoded a held request: its explorers and mode, and the rounds it took part
        in (counted here, one per `engine.step()` while held, so RPT = rounds / completion tokens)."""
        held = self.held.get(rid)
        if held is None:
            return None
        info = self.engine.info
        return pb.DexUsage(explorers=info.explorers, rounds=held.rounds, mode=info.mode or info.engine)

    def _engine_failed(self, exc: EngineFailure, cancel: bool = False) -> None:
        """The engine lost its requests (an explorer died) and restarted: each
        client gets UNAVAILABLE with the reason; the worker keeps serving.
        `cancel`: the engine still holds them; release each one there first."""
        log.error("engine failure: %s", exc)
        for rid in exc.request_ids:
            held = self.held.get(rid)
            if held is None:
                continue
            if cancel:
                self.engine.cancel(rid)
            self._retrying(lambda: self.queue.fail(held.entry, ErrorCode.UNAVAILABLE, str(exc)))
            self.observer.on_request_failed(rid, ErrorCode.UNAVAILABLE, str(exc))
            self._release(rid, Finished(rid, FinishReason.CANCELLED, 0, 0))

    def _cancel(self, rids: set[str]) -> None:
        """Stop flagged requests now (before the next round) and tell their clients."""
        events, done, fins = {}, {}, []
        for rid in rids:
            fin = self.engine.cancel(rid)
            held = self.held.get(rid)
            if held is None:
                continue
            fin = fin or Finished(rid, FinishReason.CANCELLED, 0, 0)
            events[rid] = pb.StreamEvent(attempt=held.attempt, commit_unix_nanos=time.time_ns(),
                                         finish=finish_message(fin, self._dex_usage(rid)))
            done[rid] = held.entry.entry_id
            fins.append(fin)
        self._publish(events, done, [])
        for fin in fins:
            self._release(fin.request_id, fin)

    def _release(self, rid: str, fin: Finished) -> None:
        with self._lock:
            if self.held.pop(rid, None) is None:
                return
            if not self.held:
                self.pod_guard.mark_idle()
        self.observer.on_request_finish(rid, fin)

    # ---- ownership -------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Its own thread, so a long engine call (a prefill, a first-use compile, a slow round:
        torch releases the GIL, and Python code yields it every few ms) never delays it."""
        failed = False
        while not self._exit.wait(self.settings.heartbeat_interval_s):
            with self._lock:
                ids = [h.entry.entry_id for h in self.held.values()] + list(self._taking)
            try:
                owned = self.queue.heartbeat(ids)
            except TRANSIENT as exc:   # the loop logs the outage once and reconnects
                log.debug("heartbeat failed: %s", exc)
                failed = True
                continue
            except Exception:
                log.exception("heartbeat failed")
                failed = True
                continue
            now = time.monotonic()
            late, self._last_beat = now - self._last_beat, now
            if not failed and late * 1000 > self.settings.claim_idle_ms / 2:
                log.warning("heartbeat came %.1f s after the previous one (claim idle %d ms): this process "
                            "is starved of CPU; its requests may be claimed by another worker", late,
                            self.settings.claim_idle_ms)
            failed = False
            lost = set(ids) - owned
            if lost:
                with self._lock:
                    self._lost |= lost

    def _drop_lost(self) -> None:
        """Entries another worker claimed (we were frozen past claim_idle_ms):
        stop computing them; their new owner publishes and acknowledges."""
        if not self._lost:
            return
        with self._lock:
            lost, self._lost = self._lost, set()
            gone = [rid for rid, h in self.held.items() if h.entry.entry_id in lost]
            for rid in gone:
                self.held.pop(rid)
            if gone and not self.held:
                self.pod_guard.mark_idle()
        for rid in gone:
            log.warning("lost %s to another worker; dropping it", rid)
            self.engine.cancel(rid)

    def _hand_back_all(self) -> None:
        """Shutdown with work left: re-queue it for another worker (the client
        keeps its stream; positions already sent are skipped by the gateway)."""
        for rid, held in list(self.held.items()):
            self.engine.cancel(rid)
            try:
                self.queue.hand_back(held.entry)
                log.info("handed back %s", rid)
            except Exception:
                log.exception("could not hand back %s; it will be claimed after the idle timeout", rid)
        with self._lock:
            if self.held:
                self.held.clear()
                self.pod_guard.mark_idle()
