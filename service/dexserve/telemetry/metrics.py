"""Prometheus metrics of the gateway, the queue and the workers.

Names follow Prometheus conventions: a `dex_` namespace, the unit in the
name (`_seconds`), `_total` on counters. The worker's series are fed only
from `RoundRecord`s and the loop's hooks (dexserve.telemetry.observers); the
queue's are sampled from Redis when Prometheus scrapes the gateway.

Ratios are left to PromQL, which aggregates them correctly across workers:

- RPT (rounds per committed token), fleet-wide:
  `sum(rate(dex_worker_request_rounds_total[5m])) / sum(rate(dex_worker_generated_tokens_total[5m]))`;
  per request: the `dex_worker_rounds_per_token` histogram.
- fallback rate: `sum(rate(dex_worker_commits_total{boundary="fallback"}[5m])) / sum(rate(dex_worker_commits_total[5m]))`.
- lattice occupancy: `dex_worker_lattice_live_nodes / dex_worker_lattice_slots`.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
ROUND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RPT_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
TOKENS_PER_SECOND_WINDOW_S = 10.0


DOORS = ("grpc", "http")      # the gateway's doors: DexService over gRPC, the OpenAI-compatible HTTP API


class GatewayMetrics:
    """Per-call series of one gateway, both doors (fed by the gateway observer, its gRPC interceptor and
    its HTTP middleware). `door` is grpc or http; `method` is the RPC (Generate, Complete, ListModels)
    or the HTTP route (/v1/completions, /v1/chat/completions, /v1/models); `code` is a gRPC status
    name for both doors (the gateway's one vocabulary: an HTTP stream that ends in an error event
    after its 200 counts with that error's code)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("dex_gateway_requests", "Calls ended, by door, method (RPC or HTTP route) and "
                                "gRPC status code", ["door", "method", "code"], registry=registry)
        self.errors = Counter("dex_gateway_errors", "Calls ended with a non-OK gRPC status, by door and code",
                              ["door", "code"], registry=registry)
        self.active = Gauge("dex_gateway_active_requests", "Calls in flight, by door", ["door"], registry=registry)
        self.ttft = Histogram("dex_gateway_time_to_first_token_seconds",
                              "From the call's arrival to its first token reaching the stream, by door",
                              ["door"], buckets=LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram("dex_gateway_request_duration_seconds", "Call duration, by door and method",
                                  ["door", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.streamed_tokens = Counter("dex_gateway_streamed_tokens", "Tokens passed on to clients, by door",
                                       ["door"], registry=registry)
        self.divergences = Counter("dex_gateway_divergences",
                                   "Streams ended ABORTED because a restarted attempt produced a different token "
                                   "at a position already sent (must stay 0: tokens are a function of the seed)",
                                   registry=registry)
        self.enqueued = Counter("dex_gateway_enqueued_requests", "Requests put on the queue (attached: joined a running one)",
                                ["attached"], registry=registry)
        for door in DOORS:           # both doors' series exist from the start (0, not absent)
            self.active.labels(door)
            self.ttft.labels(door)
            self.streamed_tokens.labels(door)


class WorkerMetrics:
    """Per-round and per-request series of one worker (fed from RoundRecords and the loop's hooks)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ready = Gauge("dex_worker_ready", "1 once the model is loaded and the loop takes work", registry=registry)
        self.queue_wait = Histogram("dex_worker_queue_wait_seconds", "From enqueue to the start of decoding",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("dex_worker_generated_tokens", "Committed tokens", registry=registry)
        self.tokens_per_second = Gauge("dex_worker_tokens_per_second",
                                       f"Committed tokens per second over the last {TOKENS_PER_SECOND_WINDOW_S:g} s",
                                       registry=registry)
        self.rounds = Counter("dex_worker_rounds", "Engine rounds run", registry=registry)
        self.request_rounds = Counter("dex_worker_request_rounds",
                                      "Rounds summed over the requests decoding in them (RPT numerator)",
                                      registry=registry)
        self.rpt = Histogram("dex_worker_rounds_per_token", "Rounds per committed token of each finished request",
                             buckets=RPT_BUCKETS, registry=registry)
        self.commits = Counter("dex_worker_commits", "Commits by the boundary the committed node was spawned from "
                               "(fallback: none carried the token)", ["boundary"], registry=registry)
        self.itl = Histogram("dex_worker_inter_token_latency_seconds", "Between consecutive commits of a request",
                             buckets=TOKEN_BUCKETS, registry=registry)
        self.active = Gauge("dex_worker_active_requests", "Requests decoding on this worker", registry=registry)
        self.finished = Counter("dex_worker_finished_requests", "Requests finished, by finish reason",
                                ["reason"], registry=registry)
        self.errors = Counter("dex_worker_errors", "Requests failed with an error the client sees, by gRPC status code",
                              ["code"], registry=registry)
        self.claims = Counter("dex_worker_claims", "Requests claimed from a dead worker", registry=registry)
        self.node_segments = Counter("dex_worker_node_segments", "Node-segments run by the explorers",
                                     registry=registry)
        self.wasted = Counter("dex_worker_wasted_node_segments", "Node-segments computed on nodes later dropped",
                              registry=registry)
        self.live_nodes = Gauge("dex_worker_lattice_live_nodes", "Lattice nodes alive after the last round",
                                registry=registry)
        self.slots = Gauge("dex_worker_lattice_slots", "Lattice capacity (slots)", registry=registry)
        self.round_seconds = Histogram("dex_worker_round_seconds", "Wall time of a round's parts "
                                       "(executor, lattice state machine, token publish)", ["part"],
                                       buckets=ROUND_BUCKETS, registry=registry)
        self._window: deque[tuple[float, int]] = deque()   # (monotonic time, tokens) per round
        self.tokens_per_second.set_function(self._tokens_per_second)

    def observe_round_tokens(self, n: int, now: float) -> None:
        """Remember one round's committed tokens for the tokens/s gauge."""
        self._window.append((now, n))
        if len(self._window) > 4096:
            self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - TOKENS_PER_SECOND_WINDOW_S
        try:   # the scrape thread and the loop both prune: a race only ends the loop early
            while self._window and self._window[0][0] < horizon:
                self._window.popleft()
        except IndexError:
            pass

    def _tokens_per_second(self) -> float:
        """Computed at scrape time, so an idle worker reads 0, not its last busy value."""
        now = time.monotonic()
        self._prune(now)
        return sum(n for _, n in list(self._window)) / TOKENS_PER_SECOND_WINDOW_S


class QueueCollector(Collector):
    """Queue depth, lag, in-flight entries, oldest wait and live workers, read
    from Redis at scrape time (sampled: no loop of our own, no stale values).
    Any gateway reports the same values: aggregate with max() across them."""

    FAMILIES = (
        ("dex_queue_depth_messages", "Entries in the request stream (waiting + in flight)"),
        ("dex_queue_lag_messages", "Entries not yet delivered to any worker (consumer-group lag)"),
        ("dex_queue_pending_messages", "Entries delivered to a worker and not yet acknowledged"),
        ("dex_queue_oldest_waiting_age_seconds", "Age of the oldest undelivered entry (0 when none)"),
        ("dex_workers", "Workers with a live heartbeat"),
    )

    def __init__(self, client=None, names=None) -> None:
        self.client = client   # a synchronous redis.Redis; None: describe only
        self.names = names

    def describe(self):
        return [GaugeMetricFamily(name, doc) for name, doc in self.FAMILIES]

    def collect(self):
        if self.client is None:
            return self.describe()
        try:
            values = self._sample()
        except Exception:  # Redis down: no queue series this scrape (the gateway's health says why)
            log.debug("queue sample failed", exc_info=True)
            return []
        return [GaugeMetricFamily(name, doc, value=values[name]) for name, doc in self.FAMILIES]

    def _sample(self) -> dict[str, float]:
        from dexserve.queue.lag import group_lag, pending

        names, client = self.names, self.client
        depth = int(client.xlen(names.requests))
        lag = group_lag(client, names)
        oldest = 0.0
        if lag:
            first = _first_undelivered(client, names)
            if first is not None:
                oldest = max(0.0, time.time() - int(first.split(b"-")[0]) / 1000)
        workers = sum(1 for _ in client.scan_iter(names.workers_pattern(), count=1000))
        return {"dex_queue_depth_messages": depth, "dex_queue_lag_messages": lag,
                "dex_queue_pending_messages": pending(client, names),
                "dex_queue_oldest_waiting_age_seconds": oldest, "dex_workers": workers}


def _first_undelivered(client, names) -> bytes | None:
    from dexserve.queue.protocol import GROUP

    last = "0-0"
    try:
        for g in client.xinfo_groups(names.requests):
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == GROUP:
                last = g.get("last-delivered-id")
                last = last.decode() if isinstance(last, bytes) else last
    except Exception:
        return None
    entries = client.xrange(names.requests, min=f"({last}", max="+", count=1)
    if not entries:
        return None
    entry_id = entries[0][0]
    return entry_id if isinstance(entry_id, bytes) else entry_id.encode()


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
             "summary": ("", "_sum", "_count")}


def series_names() -> set[str]:
    """Every sample name the gateway, queue and worker metrics can expose
    (what a dashboard's PromQL may reference)."""
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    WorkerMetrics(registry)
    names: set[str] = set()
    families = list(registry.collect()) + QueueCollector().describe()
    for fam in families:
        names.update(fam.name + s for s in _SUFFIXES[fam.type])
    return names
