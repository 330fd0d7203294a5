"""A minimal in-process OTLP/gRPC trace receiver (a collector's front door).

The overhead benchmark exports to it, so "tracing on" includes real
serialisation and a real gRPC export; the tests collect every process's spans
with it and check what arrived. It keeps the decoded spans in memory.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def any_value(v: common_pb2.AnyValue):
    """An OTLP AnyValue as the Python value it carries."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def attributes(kvs) -> dict:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int                     # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict
    events: list[tuple[str, dict]] = field(default_factory=list)
    start_unix_nano: int = 0
    end_unix_nano: int = 0


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, owner: "OtlpReceiver") -> None:
        self.owner = owner

    def Export(self, request, context):  # noqa: N802 (the proto's name)
        self.owner._receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep_raw: bool = True) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        self.keep_raw = keep_raw
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def start(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            service = attributes(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        service=service, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), name=s.name, kind=s.kind,
                        attributes=attributes(s.attributes),
                        events=[(e.name, attributes(e.attributes)) for e in s.events],
                        start_unix_nano=s.start_time_unix_nano, end_unix_nano=s.end_time_unix_nano))
        with self._changed:
            self.exports += 1
            self.bytes += request.ByteSize()
            if self.keep_raw:
                self.requests.append(request)
            self.spans.extend(spans)
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0) -> list[ReceivedSpan]:
        """Block until `predicate(spans)` holds; return the spans (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"spans received: {[(s.service, s.name) for s in self.spans]}")
                self._changed.wait(left)
            return list(self.spans)
