"""Spans exported over OTLP/gRPC to a local receiver arrive intact, W3C
context survives the queued message's encoding, and exporting follows the
telemetry flags, whose defaults are the standard OTEL_* variables."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.trace import SpanKind

import argparse

import pytest

from dexserve.commands.options import add_telemetry_arguments, telemetry_from_args
from dexserve.contract.records import CollapseRecord, CommitRecord, RoundRecord
from dexserve.telemetry import tracing
from dexserve.telemetry.settings import TracingSettings
from dexserve.v1 import dex_pb2 as pb


def provider_for(receiver, service: str = tracing.WORKER_SERVICE):
    return tracing.setup_tracing(TracingSettings(service, endpoint=receiver.endpoint), set_global=False)


def settings_from(argv: list[str], env: dict[str, str], monkeypatch):
    """What `dex worker` builds from these flags and this environment (the CLI edge)."""
    for key in [k for k in __import__("os").environ if k.startswith(("OTEL_", "DEX_METRICS"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_telemetry_arguments(parser, tracing.WORKER_SERVICE, 9465)
    return telemetry_from_args(parser.parse_args(argv), env)


def test_export_arrives_intact(receiver):
    provider = provider_for(receiver)
    tracer = tracing.get_tracer(provider)
    record = RoundRecord(round=7, explorers=(), spawns=(),
                         commits=(CommitRecord("r", 11, 4242, 2, 5), CommitRecord("other", 3, 1, 0, 9)),
                         collapses=(CollapseRecord("r", 11, 3, 4),), wasted_node_segments=0, live_nodes=5)
    with tracer.start_as_current_span("decode", kind=SpanKind.INTERNAL,
                                      attributes={"dex.request_id": "r", "gen_ai.request.temperature": 0.5,
                                                  "gen_ai.response.finish_reasons": ("length",), "dex.rpt": 1.25,
                                                  "dex.explorers": 4, "flag": True}) as span:
        added = tracing.add_round_events({"r": span}, record)
        ctx = span.get_span_context()
    provider.force_flush()
    [got] = receiver.wait_for(lambda s: len(s) == 1, timeout=10)
    tracing.shutdown_tracing(provider)

    assert added == 2           # the commit of "other" has no span here
    assert got.service == "dexserve-worker"
    assert got.trace_id == format(ctx.trace_id, "032x") and got.span_id == format(ctx.span_id, "016x")
    assert got.kind == trace_pb2.Span.SpanKind.SPAN_KIND_INTERNAL
    assert got.attributes == {"dex.request_id": "r", "gen_ai.request.temperature": 0.5,
                              "gen_ai.response.finish_reasons": ("length",), "dex.rpt": 1.25, "dex.explorers": 4,
                              "flag": True}
    assert got.events == [
        ("dex.commit", {"dex.round": 7, "dex.position": 11, "dex.token_id": 4242, "dex.boundary": 2}),
        ("dex.collapse", {"dex.round": 7, "dex.position": 11, "dex.nodes_kept": 3, "dex.nodes_dropped": 4}),
    ]
    raw = receiver.requests[0].resource_spans[0].scope_spans[0]
    assert raw.scope.name == tracing.INSTRUMENTATION
    assert raw.spans[0].end_time_unix_nano > raw.spans[0].start_time_unix_nano


def test_fallback_commit_is_labelled_and_many_events_are_kept(receiver):
    provider = provider_for(receiver)
    tracer = tracing.get_tracer(provider)
    with tracer.start_as_current_span("decode") as span:
        for r in range(600):      # beyond the SDK's default limit of 128 events per span
            tracing.add_round_events({"r": span}, RoundRecord(r, (), (), (CommitRecord("r", r, 1, 0, 0),), (), 0, 1))
    provider.force_flush()
    [got] = receiver.wait_for(lambda s: len(s) == 1, timeout=10)
    tracing.shutdown_tracing(provider)
    assert len(got.events) == 600
    assert {a["dex.boundary"] for _, a in got.events} == {"fallback"}


def test_w3c_context_survives_the_queued_message(receiver):
    provider = provider_for(receiver)
    tracer = tracing.get_tracer(provider)
    with tracer.start_as_current_span("send", kind=SpanKind.PRODUCER) as producer:
        msg = pb.QueuedRequest(request_id="r")
        tracing.inject_context(msg.trace_context)
    wire = pb.QueuedRequest.FromString(msg.SerializeToString())
    assert set(wire.trace_context) >= {"traceparent"}
    parent = trace.get_current_span(tracing.extract_context(wire.trace_context)).get_span_context()
    assert parent.is_remote
    assert (parent.trace_id, parent.span_id) == (producer.get_span_context().trace_id,
                                                 producer.get_span_context().span_id)
    tracing.shutdown_tracing(provider)


def test_exporting_follows_flags_whose_defaults_are_the_otel_environment(monkeypatch):
    def endpoint(env, argv=()):
        return settings_from(list(argv), env, monkeypatch).tracing.endpoint

    assert endpoint({}) is None
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "http://c:4317"
    assert endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "http://t:4317"
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}) is None
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}) is None
    # over http/protobuf the base endpoint gets the traces path, as the OpenTelemetry spec says
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) \
        == "http://c:4318/v1/traces"
    # flags win over the environment
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ["--otlp-endpoint", "off"]) is None
    assert endpoint({}, ["--otlp-endpoint", "http://f:4317"]) == "http://f:4317"
    assert tracing.setup_tracing(TracingSettings("x"), set_global=False) is None
    assert isinstance(tracing.get_tracer(None), trace.NoOpTracer)


def test_metrics_port_and_names_from_flags_and_environment(monkeypatch):
    s = settings_from([], {}, monkeypatch)
    assert (s.metrics_port, s.metrics_host, s.tracing.service_name, s.tracing.max_events) == (
        9465, "0.0.0.0", "dexserve-worker", 8192)
    s = settings_from([], {"DEX_METRICS_PORT": "off", "DEX_METRICS_HOST": "127.0.0.1", "OTEL_SERVICE_NAME": "custom",
                           "OTEL_SPAN_EVENT_COUNT_LIMIT": "100"}, monkeypatch)
    assert (s.metrics_port, s.metrics_host, s.tracing.service_name, s.tracing.max_events) == (
        None, "127.0.0.1", "custom", 100)
    s = settings_from(["--metrics-port", "0", "--service-name", "flag"], {"DEX_METRICS_PORT": "1234"}, monkeypatch)
    assert (s.metrics_port, s.tracing.service_name) == (0, "flag")
    with pytest.raises(SystemExit):                      # argparse names the flag
        settings_from(["--metrics-port", "http"], {}, monkeypatch)


def test_service_name_is_the_settings(receiver):
    for name in ("dexserve-worker", "custom"):
        p = provider_for(receiver, name)
        assert p.resource.attributes["service.name"] == name
        tracing.shutdown_tracing(p)
