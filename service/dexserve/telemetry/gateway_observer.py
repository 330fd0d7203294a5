"""The gateway's telemetry: the SERVER span and status codes of every
DexService RPC (a grpc.aio interceptor), and the enqueue PRODUCER span that
writes the W3C context into the queued message (the observer hooks).

The interceptor makes the server span current for the RPC's task, so the
servicer's hooks (`on_enqueue`, `on_first_token`, `on_finish`), which run in
that task, add to it: the request id (generated or the client's), the
producer span as its child, the first-token event and the usage.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import MutableMapping
from contextlib import contextmanager

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from dexserve.gateway.observer import GatewayObserver
from dexserve.queue.protocol import QueueNames
from dexserve.telemetry import tracing as t
from dexserve.telemetry.metrics import GatewayMetrics
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

TRACED_PREFIX = "/dexserve.v1.DexService/"
# Server spans are errors only for these codes (RPC semantic conventions); the
# rest (INVALID_ARGUMENT, NOT_FOUND, ...) are the client's doing.
_SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
_FINISH_PREFIX = "FINISH_REASON_"

_rpc_started: contextvars.ContextVar[float | None] = contextvars.ContextVar("dex_rpc_started", default=None)


def _metadata_carrier(details: grpc.HandlerCallDetails) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        if key in ("traceparent", "tracestate", "baggage"):
            carrier[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return carrier


def _request_attributes(request) -> dict:
    """GenAI request attributes the client set (defaults are filled in later: the worker's span has them all)."""
    attrs: dict = {t.GEN_AI_OPERATION: t.TEXT_COMPLETION}
    if not isinstance(request, pb.GenerateRequest):   # ListModels, or a request the lenient deserializer could not read
        return attrs
    if request.model:
        attrs[t.GEN_AI_MODEL] = request.model
    if request.HasField("max_new_tokens"):
        attrs[t.GEN_AI_MAX_TOKENS] = request.max_new_tokens
    attrs[t.GEN_AI_TEMPERATURE] = request.temperature
    if request.HasField("top_p"):
        attrs[t.GEN_AI_TOP_P] = request.top_p
    if request.request_id:
        attrs[t.REQUEST_ID] = request.request_id
    return attrs


class GatewayTelemetry(GatewayObserver, grpc.aio.ServerInterceptor):
    """Both halves in one object: the interceptor opens what the hooks fill in."""

    def __init__(self, tracer: Tracer | None = None, metrics: GatewayMetrics | None = None,
                 names: QueueNames | None = None) -> None:
        self.tracer = tracer or trace.NoOpTracer()
        self.metrics = metrics
        self.destination = (names or QueueNames()).requests

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Outermost interceptor: auth failures are counted and traced too."""
        return [self]

    # ---- interceptor -----------------------------------------------------------
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(TRACED_PREFIX):
            return handler            # health checks and reflection: neither traced nor counted
        method = details.method[len(TRACED_PREFIX):]
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream

            async def stream(request, context):
                with self._rpc(method, details, request, context):
                    async for item in behavior(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request, context):
                with self._rpc(method, details, request, context):
                    return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        return handler                # DexService has no client-streaming methods

    @contextmanager
    def _rpc(self, method: str, details: grpc.HandlerCallDetails, request, context):
        started = time.perf_counter()
        span = self.tracer.start_span(
            f"{TRACED_PREFIX[1:]}{method}", context=t.extract_context(_metadata_carrier(details)),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": TRACED_PREFIX[1:-1], "rpc.method": method,
                        **_request_attributes(request)})
        token = otel_context.attach(trace.set_span_in_context(span))
        started_token = _rpc_started.set(started)
        m = self.metrics
        if m is not None:
            m.active.inc()
        code = grpc.StatusCode.OK
        try:
            yield span
            code = _code_of(context) or grpc.StatusCode.OK
        except BaseException as exc:
            code = _code_of(context) or _code_of_exception(exc)
            raise
        finally:
            if m is not None:
                m.active.dec()
                m.requests.labels(method, code.name).inc()
                m.duration.labels(method).observe(time.perf_counter() - started)
                if code is not grpc.StatusCode.OK:
                    m.errors.labels(code.name).inc()
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
            try:
                _rpc_started.reset(started_token)
                otel_context.detach(token)
            except Exception:   # closed from another context (generator finalised late): harmless
                pass

    # ---- servicer hooks ----------------------------------------------------------
    def on_enqueue(self, request_id: str, attached: bool, trace_context: MutableMapping[str, str]) -> None:
        server = trace.get_current_span()
        if self.metrics is not None:
            self.metrics.enqueued.labels("true" if attached else "false").inc()
        if attached:
            # Joined a running request: its queued message (and worker spans) belong to the first caller's trace.
            server.set_attribute(t.ATTACHED, True)
            return
        server.set_attribute(t.REQUEST_ID, request_id)
        producer = self.tracer.start_span(
            t.PRODUCER_SPAN.format(destination=self.destination), kind=SpanKind.PRODUCER,
            attributes={t.MESSAGING_SYSTEM: "redis", t.MESSAGING_DESTINATION: self.destination,
                        t.MESSAGING_OPERATION_TYPE: "send", t.MESSAGING_MESSAGE_ID: request_id,
                        t.REQUEST_ID: request_id})
        t.inject_context(trace_context, trace.set_span_in_context(producer))
        producer.end()

    def on_first_token(self, request_id: str, commit_unix_nanos: int) -> None:
        started = _rpc_started.get()     # hooks run in the RPC's task: its arrival time is in context
        if started is not None and self.metrics is not None:
            self.metrics.ttft.observe(time.perf_counter() - started)
        server = trace.get_current_span()
        if server.is_recording():
            server.add_event(t.FIRST_TOKEN_EVENT)

    def on_divergence(self, request_id: str, position: int, attempt: int) -> None:
        if self.metrics is not None:
            self.metrics.divergences.inc()
        server = trace.get_current_span()
        if server.is_recording():
            server.add_event(t.DIVERGENCE_EVENT, {"dex.position": position, "dex.attempt": attempt,
                                                  t.REQUEST_ID: request_id})

    def on_finish(self, request_id: str, status: str, completion_tokens: int) -> None:
        if self.metrics is not None and completion_tokens:
            self.metrics.streamed_tokens.inc(completion_tokens)
        server = trace.get_current_span()
        if server.is_recording():
            reason = status[len(_FINISH_PREFIX):].lower() if status.startswith(_FINISH_PREFIX) else status.lower()
            server.set_attributes({t.GEN_AI_OUTPUT_TOKENS: completion_tokens, t.GEN_AI_FINISH_REASONS: (reason,)})


def _code_of(context) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return None


def _code_of_exception(exc: BaseException) -> grpc.StatusCode:
    import asyncio

    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
