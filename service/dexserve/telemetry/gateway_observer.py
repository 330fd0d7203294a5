"""The gateway's telemetry, the same for both doors: the SERVER span, status
and metrics of every call (a grpc.aio interceptor for DexService RPCs, an ASGI
middleware for the OpenAI-compatible HTTP door), and the enqueue PRODUCER span
that writes the W3C context into the queued message (the observer hooks).

Each door's wrapper makes the server span current for the call's task and puts
the call (door, method, arrival time) in a context variable, so the hooks that
`GatewayCore` runs in that task (`on_request`, `on_enqueue`, `on_first_token`,
`on_finish`, `on_status`) add to the right span and series: the GenAI request
attributes, the request id (generated or the client's), the producer span as
its child, the first-token event and the usage.

HTTP server spans follow the stable HTTP semantic conventions (span name
`{method} {http.route}`, `http.request.method`, `http.route`, `url.*`,
`server.*`, `client.address`, `http.response.status_code`, `error.type`; an
incoming `traceparent` is continued). `opentelemetry-instrumentation-asgi` was
not used: by default it writes the deprecated attribute names (the stable ones
need OTEL_SEMCONV_STABILITY_OPT_IN=http in the process environment, read once
per process), names spans by raw path and opens a span per ASGI message (one per
server-sent event), and keeps OpenTelemetry metrics beside the Prometheus ones;
undoing that took more code than the span itself. Like gRPC's health checks,
`/health` and unknown paths are neither traced nor counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from dexserve.gateway.http_api import HTTP_STATUS
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

GRPC, HTTP = "grpc", "http"           # the `door` label and span attribute
# The HTTP door's traced routes (as `http.route` and the metrics' `method`) and their GenAI operation.
HTTP_ROUTES = {"/v1/completions": t.TEXT_COMPLETION, "/v1/chat/completions": t.CHAT, "/v1/models": None}
_HTTP_FALLBACK = {401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
                  405: grpc.StatusCode.UNIMPLEMENTED, 409: grpc.StatusCode.ALREADY_EXISTS,
                  429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
                  503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class _Call:
    """One call in progress, whichever door: what the hooks need to label what they record."""

    door: str
    method: str                   # the RPC's name, or the HTTP route
    started: float                # time.perf_counter() at arrival
    status: str | None = None     # the gRPC status name the door reported (HTTP)


_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("dex_gateway_call", default=None)


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
    if request.messages:
        attrs[t.GEN_AI_OPERATION] = t.CHAT
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

    def asgi_middleware(self, app):
        """The HTTP door's app wrapped in its server span and metrics (outermost: auth failures too)."""
        return _HttpTelemetry(app, self)

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
                        t.DOOR: GRPC, **_request_attributes(request)})
        token = otel_context.attach(trace.set_span_in_context(span))
        call_token = _call.set(_Call(GRPC, method, started))
        self._begin(GRPC)
        code = grpc.StatusCode.OK
        try:
            yield span
            code = _code_of(context) or grpc.StatusCode.OK
        except BaseException as exc:
            code = _code_of(context) or _code_of_exception(exc)
            raise
        finally:
            self._end(GRPC, method, code.name, started)
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
            try:
                _call.reset(call_token)
                otel_context.detach(token)
            except Exception:   # closed from another context (generator finalised late): harmless
                pass

    def _begin(self, door: str) -> None:
        if self.metrics is not None:
            self.metrics.active.labels(door).inc()

    def _end(self, door: str, method: str, code: str, started: float) -> None:
        m = self.metrics
        if m is not None:
            m.active.labels(door).dec()
            m.requests.labels(door, method, code).inc()
            m.duration.labels(door, method).observe(time.perf_counter() - started)
            if code != "OK":
                m.errors.labels(door, code).inc()

    # ---- the HTTP door -----------------------------------------------------------
    async def http_call(self, app, scope, receive, send) -> None:
        """One traced and counted HTTP request (`_HttpTelemetry` routes the API's paths here)."""
        started = time.perf_counter()
        route = scope["path"]
        method = scope.get("method", "")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        carrier = {k: headers[k] for k in ("traceparent", "tracestate", "baggage") if k in headers}
        attrs = {t.HTTP_REQUEST_METHOD: method, t.HTTP_ROUTE: route, t.URL_PATH: route,
                 t.URL_SCHEME: scope.get("scheme", "http"), t.DOOR: HTTP}
        if scope.get("http_version"):
            attrs[t.NETWORK_PROTOCOL_VERSION] = scope["http_version"]
        if scope.get("server"):
            attrs[t.SERVER_ADDRESS], attrs[t.SERVER_PORT] = scope["server"][0], scope["server"][1]
        if host := headers.get("host"):                      # what the client addressed wins
            name, _, port = host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
            attrs[t.SERVER_ADDRESS] = name.strip("[]")
            if port:
                attrs[t.SERVER_PORT] = int(port)
        if scope.get("client"):
            attrs[t.CLIENT_ADDRESS] = scope["client"][0]
        if agent := headers.get("user-agent"):
            attrs[t.USER_AGENT_ORIGINAL] = agent
        if operation := HTTP_ROUTES.get(route):
            attrs[t.GEN_AI_OPERATION] = operation
        span = self.tracer.start_span(f"{method} {route}", context=t.extract_context(carrier), kind=SpanKind.SERVER,
                                      attributes=attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        call = _Call(HTTP, route, started)
        call_token = _call.set(call)
        status: int | None = None

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self._begin(HTTP)
        error_type = None
        try:
            await app(scope, receive, send_and_note)
        except BaseException as exc:
            error_type = type(exc).__qualname__
            if call.status is None:
                gone = isinstance(exc, (asyncio.CancelledError, OSError)) or error_type == "ClientDisconnect"
                call.status = (grpc.StatusCode.CANCELLED if gone else grpc.StatusCode.UNKNOWN).name
            raise
        finally:
            code = call.status or _code_of_http(status)
            self._end(HTTP, route, code, started)
            if span.is_recording():
                span.set_attribute(t.DEX_STATUS, code)
                if status is not None:
                    span.set_attribute(t.HTTP_RESPONSE_STATUS_CODE, status)
                # An error by HTTP's rule for servers (5xx; error.type the status code), or by the status an
                # HTTP answer would have had: a stream that ended in an error event after its 200, or a crash
                # before any answer (error.type the gRPC status name / the exception). A client that left is not.
                if status is not None and status != 200:
                    error, kind = status >= 500, str(status)
                else:
                    error, kind = _http_status_of(code) >= 500, error_type or code
                if error and code != grpc.StatusCode.CANCELLED.name:
                    span.set_attribute(t.ERROR_TYPE, kind)
                    span.set_status(Status(StatusCode.ERROR, code))
            span.end()
            try:
                _call.reset(call_token)
                otel_context.detach(token)
            except Exception:   # closed from another context: harmless
                pass

    # ---- servicer hooks ----------------------------------------------------------
    def on_request(self, request: pb.GenerateRequest) -> None:
        server = trace.get_current_span()
        if server.is_recording():
            server.set_attributes(_request_attributes(request))

    def on_status(self, status: str) -> None:
        call = _call.get()
        if call is not None:
            call.status = status

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
        call = _call.get()               # hooks run in the call's task: its door and arrival time are in context
        if call is not None and self.metrics is not None:
            self.metrics.ttft.labels(call.door).observe(time.perf_counter() - call.started)
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
            call = _call.get()
            self.metrics.streamed_tokens.labels(call.door if call else GRPC).inc(completion_tokens)
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


def _code_of_http(status: int | None) -> str:
    """A status name for an HTTP answer the door did not describe itself (405, a crash)."""
    if status is None:
        return grpc.StatusCode.UNKNOWN.name
    if status < 400:
        return grpc.StatusCode.OK.name
    code = _HTTP_FALLBACK.get(status)
    if code is None:
        code = grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL
    return code.name


def _http_status_of(code: str) -> int:
    """The status the HTTP door answers a gRPC status with (`http_api.HTTP_STATUS`, its one home)."""
    if code == "OK":
        return 200
    if code == "CANCELLED":
        return 499
    entry = HTTP_STATUS.get(getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN))
    return entry[0] if entry else 500


class _HttpTelemetry:
    """ASGI middleware: the API's routes through `GatewayTelemetry.http_call`, the rest untouched."""

    def __init__(self, app, owner: GatewayTelemetry) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path") in HTTP_ROUTES:
            await self.owner.http_call(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _code_of_exception(exc: BaseException) -> grpc.StatusCode:
    import asyncio

    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
