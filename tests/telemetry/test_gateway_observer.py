"""The gateway's interceptor and hooks in-process (stand-in model, no worker:
only the gateway's side matters here): server span per RPC with its status
code, the producer span injected into the queued message, errors by code,
auth failures included."""

from __future__ import annotations

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
from dexserve.queue.protocol import REQUEST_FIELD
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
                                         names=names, settings=TEST_SETTINGS, auth_token="s3cret"), observer)
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

    assert sample("dex_gateway_errors_total", code="UNAUTHENTICATED") == 1
    assert sample("dex_gateway_requests_total", method="ListModels", code="OK") == 1
    assert sample("dex_gateway_errors_total", code="DEADLINE_EXCEEDED") + \
        sample("dex_gateway_errors_total", code="CANCELLED") == 1
    assert sample("dex_gateway_active_requests") == 0
    assert "grpc.health.v1.Health/Check" not in by_name
