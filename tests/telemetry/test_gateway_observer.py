"""The gateway's interceptor, HTTP middleware and hooks in-process (stand-in
model, no worker: only the gateway's side matters here; where tokens are
needed the test publishes them as a worker would): server span per call with
its status code, on both doors, the producer span injected into the queued
message, errors and time to first token by door, auth failures included."""

from __future__ import annotations

import http.client
import json
import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from dexserve.gateway.config import GatewayConfig
from dexserve.gateway.server import BackgroundGateway
from dexserve.queue.protocol import EVENT_FIELD, REQUEST_FIELD
from dexserve.telemetry.gateway_observer import GatewayTelemetry
from dexserve.telemetry.metrics import GatewayMetrics
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc

from .conftest import TEST_SETTINGS


@pytest.fixture
def traced_gateway(redis_server, names, standin_model):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    observer = GatewayTelemetry(provider.get_tracer("test"), GatewayMetrics(registry), names)
    gw = BackgroundGateway(GatewayConfig(redis_url=redis_server.url, port=0, model=str(standin_model),
                                         names=names, settings=TEST_SETTINGS, auth_token="s3cret", http_port=0),
                           observer)
    yield gw, exporter, registry
    gw.stop()


def test_server_and_producer_spans_and_status_codes(traced_gateway, rclient, names):
    gw, exporter, registry = traced_gateway
    with grpc.insecure_channel(gw.address) as ch:
        stub = dex_pb2_grpc.DexServiceStub(ch)
        auth = [("authorization", "Bearer s3cret")]
        with pytest.raises(grpc.RpcError) as err:          # no token: UNAUTHENTICATED, still traced and counted
            stub.Complete(pb.GenerateRequest(prompt="x"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:          # the client's deadline passes: no worker runs it
            stub.Complete(pb.GenerateRequest(prompt="hello", request_id="rid-1", max_new_tokens=5,
                                             temperature=0.5), metadata=auth, timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stub.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=10)

    def sample(name, **labels):
        return registry.get_sample_value(name, labels) or 0.0

    deadline = time.monotonic() + 10      # the server learns of the client's deadline a moment after it
    while sum(s.name.endswith("/Complete") for s in exporter.get_finished_spans()) < 2:
        assert time.monotonic() < deadline, [s.name for s in exporter.get_finished_spans()]
        time.sleep(0.05)
    spans = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    completes = by_name["dexserve.v1.DexService/Complete"]
    assert sorted(s.attributes["rpc.grpc.status_code"] for s in completes) in ([1, 16], [4, 16])
    server = next(s for s in completes if s.attributes.get("dex.request_id") == "rid-1")
    assert server.kind == trace.SpanKind.SERVER
    assert server.attributes["gen_ai.request.max_tokens"] == 5
    assert server.attributes["gen_ai.request.temperature"] == 0.5
    [producer] = by_name[f"send {names.requests}"]
    assert producer.kind == trace.SpanKind.PRODUCER
    assert producer.parent.span_id == server.context.span_id
    assert producer.attributes["messaging.message.id"] == "rid-1"

    # the queued message carries the producer's context
    [(_, fields)] = rclient.xrange(names.requests)
    queued = pb.QueuedRequest.FromString(fields[REQUEST_FIELD])
    assert f"{producer.context.span_id:016x}" in queued.trace_context["traceparent"]
    assert f"{server.context.trace_id:032x}" in queued.trace_context["traceparent"]

    assert sample("dex_gateway_errors_total", door="grpc", code="UNAUTHENTICATED") == 1
    assert sample("dex_gateway_requests_total", door="grpc", method="ListModels", code="OK") == 1
    assert sample("dex_gateway_errors_total", door="grpc", code="DEADLINE_EXCEEDED") + \
        sample("dex_gateway_errors_total", door="grpc", code="CANCELLED") == 1
    assert sample("dex_gateway_active_requests", door="grpc") == 0
    assert server.attributes["dex.door"] == "grpc"
    assert "grpc.health.v1.Health/Check" not in by_name


def _spans_named(exporter, name: str, n: int) -> list:
    deadline = time.monotonic() + 10
    while len(spans := [s for s in exporter.get_finished_spans() if s.name == name]) < n:
        assert time.monotonic() < deadline, [s.name for s in exporter.get_finished_spans()]
        time.sleep(0.02)
    return spans


def _send(gw, path: str, body: dict, headers: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **headers})
    return conn


def _post(gw, path: str, body: dict, headers: dict) -> http.client.HTTPResponse:
    return _send(gw, path, body, headers).getresponse()


def test_http_door_has_server_spans_and_metrics_like_grpc(traced_gateway, rclient, names):
    gw, exporter, registry = traced_gateway
    sample = lambda name, **labels: registry.get_sample_value(name, labels) or 0.0  # noqa: E731
    auth = {"authorization": "Bearer s3cret"}

    # no token: 401, traced and counted
    resp = _post(gw, "/v1/completions", {"prompt": "x"}, {})
    assert resp.status == 401
    resp.read()
    [denied] = _spans_named(exporter, "POST /v1/completions", 1)
    assert denied.kind == trace.SpanKind.SERVER
    assert denied.attributes["http.response.status_code"] == 401 and denied.attributes["dex.status"] == "UNAUTHENTICATED"
    assert denied.status.status_code == trace.StatusCode.UNSET           # a 4xx is the client's doing
    assert sample("dex_gateway_errors_total", door="http", code="UNAUTHENTICATED") == 1

    # a streamed completion continuing the client's trace; this test plays the worker
    client_trace, client_span = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = f"00-{client_trace:032x}-{client_span:016x}-01"
    conn = _send(gw, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True},
                 {**auth, "traceparent": traceparent, "user-agent": "test-agent/1"})   # answers with the first chunk
    deadline = time.monotonic() + 10
    while not rclient.xlen(names.requests):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [(_, fields)] = rclient.xrange(names.requests)
    queued = pb.QueuedRequest.FromString(fields[REQUEST_FIELD])
    rid = queued.request_id
    event = pb.StreamEvent(attempt=1, commit_unix_nanos=time.time_ns(),
                           tokens=[pb.TokenMessage(index=i, token_id=7 + i, text=f"<{i}>") for i in range(3)])
    event.finish.CopyFrom(pb.FinishMessage(reason=pb.FINISH_REASON_LENGTH,
                                           usage=pb.Usage(prompt_tokens=1, completion_tokens=3)))
    rclient.xadd(names.tokens(rid), {EVENT_FIELD: event.SerializeToString()})
    resp = conn.getresponse()
    assert resp.status == 200
    body = resp.read().decode()
    assert body.rstrip().endswith("data: [DONE]") and "<0><1><2>" in "".join(
        json.loads(line[6:])["choices"][0]["text"] for line in body.splitlines()
        if line.startswith("data: {"))

    _, server = _spans_named(exporter, "POST /v1/completions", 2)
    a = server.attributes
    assert server.kind == trace.SpanKind.SERVER
    assert (server.context.trace_id, server.parent.span_id) == (client_trace, client_span)   # the client's trace
    assert {k: a[k] for k in ("http.request.method", "http.route", "url.path", "url.scheme", "server.port",
                              "client.address", "user_agent.original", "http.response.status_code")} == {
        "http.request.method": "POST", "http.route": "/v1/completions", "url.path": "/v1/completions",
        "url.scheme": "http", "server.port": gw.http_port, "client.address": "127.0.0.1",
        "user_agent.original": "test-agent/1", "http.response.status_code": 200}
    # the dex / GenAI attributes the gRPC door's span carries
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.max_tokens"] == 3
    assert a["gen_ai.request.temperature"] == 0.0 and a["dex.request_id"] == rid and a["dex.door"] == "http"
    assert a["gen_ai.usage.output_tokens"] == 3 and a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["dex.status"] == "OK" and server.status.status_code == trace.StatusCode.UNSET
    assert [e.name for e in server.events] == ["dex.first_token"]
    # joined to the worker's spans as gRPC requests are: the producer's context rides in the queued message
    [producer] = [s for s in exporter.get_finished_spans() if s.name == f"send {names.requests}"]
    assert producer.parent.span_id == server.context.span_id and producer.context.trace_id == client_trace
    assert f"{client_trace:032x}-{producer.context.span_id:016x}" in queued.trace_context["traceparent"]

    assert sample("dex_gateway_time_to_first_token_seconds_count", door="http") == 1
    assert sample("dex_gateway_time_to_first_token_seconds_count", door="grpc") == 0
    assert sample("dex_gateway_requests_total", door="http", method="/v1/completions", code="OK") == 1
    assert sample("dex_gateway_request_duration_seconds_count", door="http", method="/v1/completions") == 2
    assert sample("dex_gateway_streamed_tokens_total", door="http") == 3
    assert sample("dex_gateway_active_requests", door="http") == 0

    # bad input: 400 on a traced span; /health is neither traced nor counted (as gRPC health checks)
    resp = _post(gw, "/v1/chat/completions", {"messages": "nope"}, auth)
    assert resp.status == 400
    resp.read()
    [chat] = _spans_named(exporter, "POST /v1/chat/completions", 1)
    assert chat.attributes["gen_ai.operation.name"] == "chat" and chat.attributes["dex.status"] == "INVALID_ARGUMENT"
    assert sample("dex_gateway_errors_total", door="http", code="INVALID_ARGUMENT") == 1
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    assert not [s for s in exporter.get_finished_spans() if "health" in s.name]
