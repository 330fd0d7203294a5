"""Metrics fed from RoundRecords and hooks, the queue sampler against a real
Redis, and the metrics port's /healthz contract (503 until ready)."""

from __future__ import annotations

import time

import redis
from prometheus_client import CollectorRegistry

from dexserve.contract.records import CollapseRecord, CommitRecord, RoundRecord, RowRecord
from dexserve.contract.request import Finished, FinishReason
from dexserve.queue.protocol import GROUP, REQUEST_FIELD
from dexserve.telemetry.endpoint import MetricsServer
from dexserve.telemetry.metrics import QueueCollector, WorkerMetrics, series_names
from dexserve.telemetry.worker_observer import WorkerTelemetry
from dexserve.v1 import dex_pb2 as pb

from .conftest import http_get


def value(registry: CollectorRegistry, name: str, **labels) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def record(r: int, commits=(), collapses=(), wasted=0, live=3) -> RoundRecord:
    rows = ((RowRecord("a", 1, 5, 0, 7),), (RowRecord("a", 1, 5, 0, 7), RowRecord("a", 2, 6, 1, 8)))
    return RoundRecord(r, rows, (), tuple(commits), tuple(collapses), wasted, live, seconds=0.002,
                       lattice_seconds=0.0001)


def test_healthz_is_503_until_ready_and_metrics_are_served():
    reg = CollectorRegistry()
    WorkerMetrics(reg)
    server = MetricsServer(0, host="127.0.0.1", registry=reg).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert http_get(base + "/healthz")[0] == 503
        server.set_ready()
        assert http_get(base + "/healthz")[0] == 200
        code, text = http_get(base + "/metrics")
        assert code == 200 and "dex_worker_generated_tokens_total" in text
        assert http_get(base + "/")[0] == 404
        server.set_ready(False)
        assert http_get(base + "/healthz")[0] == 503
    finally:
        server.stop()


def test_worker_metrics_come_from_records_and_hooks():
    reg = CollectorRegistry()
    obs = WorkerTelemetry(metrics=WorkerMetrics(reg), slots=12)
    q = pb.QueuedRequest(request_id="a", enqueued_unix_ms=int(time.time() * 1000) - 250,
                         request=pb.GenerateRequest(request_id="a", max_new_tokens=3))
    obs.on_request_start(q, 1)
    assert value(reg, "dex_worker_active_requests") == 1
    obs.on_round(record(0, [CommitRecord("a", 5, 7, 0, 1)], [CollapseRecord("a", 5, 0, 1)], wasted=1), [], [], 0.001)
    obs.on_round(record(1), [], [], 0.001)
    obs.on_round(record(2, [CommitRecord("a", 6, 8, 2, 2)]), [], [], 0.001)
    obs.on_round(record(3, [CommitRecord("a", 7, 9, 1, 3)], live=2), [], [], 0.001)
    obs.on_request_finish("a", Finished("a", FinishReason.LENGTH, 5, 3))

    assert value(reg, "dex_worker_generated_tokens_total") == 3
    assert value(reg, "dex_worker_commits_total", boundary="fallback") == 1
    assert value(reg, "dex_worker_commits_total", boundary="1") == 1
    assert value(reg, "dex_worker_commits_total", boundary="2") == 1
    assert value(reg, "dex_worker_rounds_total") == 4
    assert value(reg, "dex_worker_request_rounds_total") == 4
    assert value(reg, "dex_worker_rounds_per_token_sum") == 4 / 3
    assert value(reg, "dex_worker_inter_token_latency_seconds_count") == 2
    assert value(reg, "dex_worker_node_segments_total") == 4 * 3
    assert value(reg, "dex_worker_wasted_node_segments_total") == 1
    assert value(reg, "dex_worker_lattice_live_nodes") == 2
    assert value(reg, "dex_worker_lattice_slots") == 12
    assert value(reg, "dex_worker_round_seconds_count", part="executor") == 4
    assert value(reg, "dex_worker_tokens_per_second") > 0
    assert 0.2 < value(reg, "dex_worker_queue_wait_seconds_sum") < 5
    assert value(reg, "dex_worker_finished_requests_total", reason="length") == 1
    assert value(reg, "dex_worker_active_requests") == 0
    obs.on_request_failed("b", 3, "prompt: too long")
    obs.on_claim("c", 2)
    assert value(reg, "dex_worker_errors_total", code="INVALID_ARGUMENT") == 1
    assert value(reg, "dex_worker_claims_total") == 1


def test_untraced_worker_keeps_no_spans():
    obs = WorkerTelemetry()              # the API's no-op tracer: what a worker without an endpoint runs
    obs.on_request_start(pb.QueuedRequest(request_id="a", request=pb.GenerateRequest(request_id="a")), 1)
    assert obs._spans == {}
    obs.on_round(record(0, [CommitRecord("a", 5, 7, 0, 1)]), [], [], 0.0)
    obs.on_request_finish("a", Finished("a", FinishReason.LENGTH, 1, 1))
    assert obs._running == {}


def test_queue_collector_samples_depth_lag_pending_and_workers(redis_server, names):
    client = redis.Redis.from_url(redis_server.url)
    try:
        reg = CollectorRegistry()
        reg.register(QueueCollector(client, names))
        assert value(reg, "dex_queue_depth_messages") == 0
        client.xgroup_create(names.requests, GROUP, id="0", mkstream=True)
        for i in range(3):
            client.xadd(names.requests, {REQUEST_FIELD: b"x%d" % i})
        client.xreadgroup(GROUP, "w1", {names.requests: ">"}, count=1)
        client.set(names.worker("w1"), 1, ex=10)
        time.sleep(0.01)
        assert value(reg, "dex_queue_depth_messages") == 3
        assert value(reg, "dex_queue_lag_messages") == 2
        assert value(reg, "dex_queue_pending_messages") == 1
        assert value(reg, "dex_queue_oldest_waiting_age_seconds") > 0
        assert value(reg, "dex_workers") == 1
    finally:
        client.delete(names.requests, names.worker("w1"))
        client.close()


def test_queue_collector_is_silent_when_redis_is_down():
    reg = CollectorRegistry()
    reg.register(QueueCollector(redis.Redis(port=1, socket_connect_timeout=0.2), None))
    assert reg.get_sample_value("dex_queue_depth_messages") is None


def test_series_names_follow_prometheus_conventions():
    names = series_names()
    assert "dex_worker_generated_tokens_total" in names and "dex_queue_lag_messages" in names
    for n in names:
        assert n.startswith("dex_")
    histograms = {n[:-len("_bucket")] for n in names if n.endswith("_bucket")}
    assert histograms - {"dex_worker_rounds_per_token"} == {h for h in histograms if h.endswith("_seconds")}
