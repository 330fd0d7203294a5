"""One request through a real gateway, a real Redis and a real worker process:
one trace id end to end, the span tree, one commit event per committed token
(from the real engine's records), and metrics that move."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from dexserve.client import stream_generate
from dexserve.telemetry.metrics import series_names

from .conftest import http_get

pytestmark = pytest.mark.slow
KIND = trace_pb2.Span.SpanKind
MAX_NEW = 12


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    code, text = http_get(base + "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def generate(stack, rid: str) -> list:
    return list(stream_generate(stack.address, "def add(a, b):", max_new_tokens=MAX_NEW, request_id=rid, timeout=120))


def test_worker_healthz_is_503_until_the_model_is_loaded(stack):
    assert stack.healthz_seen[-1] == 200
    assert 503 in stack.healthz_seen, stack.healthz_seen
    assert http_get(stack.gateway_metrics + "/healthz")[0] == 200
    assert http_get(stack.worker_metrics + "/nope")[0] == 404


def test_one_trace_end_to_end_with_one_commit_event_per_token(stack):
    rid = f"trace-{uuid.uuid4().hex[:8]}"
    chunks = generate(stack, rid)
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == MAX_NEW

    def complete(spans):
        mine = [s for s in spans if s.attributes.get("dex.request_id") == rid]
        return {s.name for s in mine} >= {"dexserve.v1.DexService/Generate", f"send {stack.names.requests}",
                                          f"process {stack.names.requests}", "decode"}

    spans = stack.receiver.wait_for(complete, timeout=30)
    mine = {s.name: s for s in spans if s.attributes.get("dex.request_id") == rid}
    server = mine["dexserve.v1.DexService/Generate"]
    producer = mine[f"send {stack.names.requests}"]
    consumer = mine[f"process {stack.names.requests}"]
    decode = mine["decode"]

    # one trace id across both processes, and the tree server → producer → consumer → decode
    assert len({s.trace_id for s in (server, producer, consumer, decode)}) == 1
    assert len([s for s in spans if s.trace_id == server.trace_id]) == 4
    assert server.parent_span_id == ""
    assert producer.parent_span_id == server.span_id
    assert consumer.parent_span_id == producer.span_id
    assert decode.parent_span_id == consumer.span_id
    assert (server.kind, producer.kind, consumer.kind, decode.kind) == (
        KIND.SPAN_KIND_SERVER, KIND.SPAN_KIND_PRODUCER, KIND.SPAN_KIND_CONSUMER, KIND.SPAN_KIND_INTERNAL)
    assert {server.service, producer.service} == {"dexserve-gateway"}
    assert {consumer.service, decode.service} == {"dexserve-worker"}

    # exactly one commit event per committed token, in order, carrying the streamed token ids
    commits = [a for name, a in decode.events if name == "dex.commit"]
    assert [a["dex.token_id"] for a in commits] == tokens
    positions = [a["dex.position"] for a in commits]
    assert positions == list(range(positions[0], positions[0] + MAX_NEW))
    assert all(a["dex.boundary"] == "fallback" or a["dex.boundary"] >= 1 for a in commits)
    rounds = [a["dex.round"] for a in commits]
    assert rounds == sorted(rounds) and len(set(rounds)) == MAX_NEW
    collapses = [a for name, a in decode.events if name == "dex.collapse"]
    assert collapses and all({"dex.nodes_kept", "dex.nodes_dropped", "dex.round", "dex.position"} <= set(a)
                             for a in collapses)

    # semantic-convention attributes
    assert server.attributes["rpc.system"] == "grpc" and server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["gen_ai.usage.output_tokens"] == MAX_NEW
    assert producer.attributes["messaging.system"] == "redis"
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.destination.name"] == stack.names.requests
    assert consumer.attributes["messaging.operation.type"] == "process"
    assert consumer.attributes["messaging.message.id"] == rid
    da = decode.attributes
    assert da["gen_ai.operation.name"] == "text_completion"
    assert da["gen_ai.request.model"] == "tiny-llama"
    assert da["gen_ai.request.max_tokens"] == MAX_NEW
    assert da["gen_ai.usage.output_tokens"] == MAX_NEW and da["gen_ai.usage.input_tokens"] > 0
    assert da["gen_ai.response.finish_reasons"] == ("length",)
    assert da["dex.explorers"] == 2 and da["dex.mode"] == "dex" and da["dex.rpt"] >= 1.0
    # the final chunk's usage says the same: rounds counted by the worker loop, RPT as the decode span's
    dex = chunks[-1].usage.dex
    assert (dex.explorers, dex.mode) == (2, "dex") and dex.rounds / MAX_NEW == da["dex.rpt"]


def test_metrics_serve_the_listed_series_and_move(stack):
    gw0, wk0 = scrape(stack.gateway_metrics), scrape(stack.worker_metrics)
    generate(stack, f"metrics-{uuid.uuid4().hex[:8]}")
    with grpc.insecure_channel(stack.address) as ch:      # an error by status code
        from dexserve.v1 import dex_pb2 as pb
        from dexserve.v1 import dex_pb2_grpc

        with pytest.raises(grpc.RpcError) as err:
            list(dex_pb2_grpc.DexServiceStub(ch).Generate(pb.GenerateRequest(model="nope", prompt="x"), timeout=30))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the server counts the error after the status reaches the client: wait for it to land
    deadline = time.monotonic() + 10
    while True:
        gw1, wk1 = scrape(stack.gateway_metrics), scrape(stack.worker_metrics)
        if total(gw1, "dex_gateway_errors_total", code="NOT_FOUND") > total(gw0, "dex_gateway_errors_total",
                                                                             code="NOT_FOUND"):
            break
        if time.monotonic() > deadline:
            break  # the assertions below report what is missing
        time.sleep(0.1)

    exposed = {n for n, _ in gw1} | {n for n, _ in wk1}
    listed = {"dex_queue_depth_messages", "dex_queue_lag_messages", "dex_queue_pending_messages",
              "dex_queue_oldest_waiting_age_seconds", "dex_workers", "dex_gateway_active_requests",
              "dex_gateway_time_to_first_token_seconds_bucket", "dex_gateway_errors_total",
              "dex_gateway_requests_total", "dex_worker_queue_wait_seconds_bucket",
              "dex_worker_inter_token_latency_seconds_bucket", "dex_worker_generated_tokens_total",
              "dex_worker_tokens_per_second", "dex_worker_rounds_per_token_bucket", "dex_worker_request_rounds_total",
              "dex_worker_commits_total", "dex_worker_active_requests", "dex_worker_wasted_node_segments_total",
              "dex_worker_lattice_live_nodes", "dex_worker_lattice_slots", "dex_worker_ready"}
    assert listed <= exposed, listed - exposed
    assert {n for n in exposed if n.startswith("dex_")} <= series_names()

    moved = lambda name, a, b, **l: total(b, name, **l) - total(a, name, **l)  # noqa: E731
    assert moved("dex_worker_generated_tokens_total", wk0, wk1) == MAX_NEW
    assert moved("dex_worker_commits_total", wk0, wk1) == MAX_NEW
    assert moved("dex_worker_inter_token_latency_seconds_count", wk0, wk1) == MAX_NEW - 1
    assert moved("dex_worker_queue_wait_seconds_count", wk0, wk1) == 1
    assert moved("dex_worker_rounds_per_token_count", wk0, wk1) == 1
    assert moved("dex_worker_request_rounds_total", wk0, wk1) >= MAX_NEW
    assert moved("dex_worker_finished_requests_total", wk0, wk1, reason="length") == 1
    assert total(wk1, "dex_worker_tokens_per_second") > 0
    assert total(wk1, "dex_worker_ready") == 1
    assert total(wk1, "dex_worker_lattice_slots") > 0
    assert moved("dex_gateway_requests_total", gw0, gw1, method="Generate", code="OK") == 1
    assert moved("dex_gateway_errors_total", gw0, gw1, code="NOT_FOUND") == 1
    assert moved("dex_gateway_time_to_first_token_seconds_count", gw0, gw1) == 1
    assert moved("dex_gateway_streamed_tokens_total", gw0, gw1) == MAX_NEW
    assert total(gw1, "dex_workers") == 1
    assert total(gw1, "dex_gateway_active_requests") == 0


def test_an_http_request_is_one_trace_with_the_worker_and_moves_the_door_metrics(stack):
    """The OpenAI door: its server span continues the client's trace and parents the worker's spans
    through the queue, as a gRPC call's does; TTFT, requests and tokens count under door="http"."""
    import openai

    gw0 = scrape(stack.gateway_metrics)
    client_trace, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        out = client.completions.create(model="tiny-llama", prompt="def add(a, b):", max_tokens=MAX_NEW, temperature=0,
                                        extra_headers={"traceparent": f"00-{client_trace}-{client_span}-01"})
        streamed = list(client.completions.create(model="tiny-llama", prompt="import os", max_tokens=MAX_NEW,
                                                  temperature=0, stream=True))
    assert out.usage.completion_tokens == MAX_NEW and streamed[-1].choices[0].finish_reason == "length"
    rid = out.id.removeprefix("cmpl-")

    def complete(spans):
        mine = [s for s in spans if s.attributes.get("dex.request_id") == rid]
        return {s.name for s in mine} >= {"POST /v1/completions", f"send {stack.names.requests}",
                                          f"process {stack.names.requests}", "decode"}

    spans = stack.receiver.wait_for(complete, timeout=30)
    mine = {s.name: s for s in spans if s.attributes.get("dex.request_id") == rid}
    server = mine["POST /v1/completions"]
    producer, consumer = mine[f"send {stack.names.requests}"], mine[f"process {stack.names.requests}"]
    decode = mine["decode"]
    assert {s.trace_id for s in (server, producer, consumer, decode)} == {client_trace}
    assert server.parent_span_id == client_span                       # the client's traceparent is continued
    assert producer.parent_span_id == server.span_id
    assert consumer.parent_span_id == producer.span_id and decode.parent_span_id == consumer.span_id
    assert server.kind == KIND.SPAN_KIND_SERVER and server.service == "dexserve-gateway"
    assert consumer.service == "dexserve-worker"
    a = server.attributes
    assert (a["http.request.method"], a["http.route"], a["url.scheme"], a["http.response.status_code"]) == (
        "POST", "/v1/completions", "http", 200)
    assert a["server.port"] == int(stack.http_url.rsplit(":", 1)[1]) and a["client.address"] == "127.0.0.1"
    assert a["dex.door"] == "http" and a["dex.status"] == "OK"
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny-llama"
    assert a["gen_ai.request.max_tokens"] == MAX_NEW and a["gen_ai.usage.output_tokens"] == MAX_NEW
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert "dex.first_token" in [name for name, _ in server.events]
    # usage.dex: an extra key the official client keeps; the RPT is the decode span's
    dex = out.usage.model_extra["dex"]
    assert (dex["explorers"], dex["mode"]) == (2, "dex") and dex["rpt"] == decode.attributes["dex.rpt"]
    assert dex["rounds"] == dex["rpt"] * MAX_NEW and MAX_NEW <= dex["rounds"] <= 2 * MAX_NEW   # K=2: ar would be 2

    deadline = time.monotonic() + 10     # a call is counted when its handler returns, just after its last byte
    while True:
        gw1 = scrape(stack.gateway_metrics)
        moved = lambda name, **l: total(gw1, name, **l) - total(gw0, name, **l)  # noqa: E731
        if moved("dex_gateway_requests_total", door="http") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert moved("dex_gateway_time_to_first_token_seconds_count", door="http") == 2
    assert moved("dex_gateway_time_to_first_token_seconds_count", door="grpc") == 0
    assert moved("dex_gateway_requests_total", door="http", method="/v1/completions", code="OK") == 2
    assert moved("dex_gateway_request_duration_seconds_count", door="http", method="/v1/completions") == 2
    assert moved("dex_gateway_streamed_tokens_total", door="http") == 2 * MAX_NEW
    assert total(gw1, "dex_gateway_active_requests", door="http") == 0
