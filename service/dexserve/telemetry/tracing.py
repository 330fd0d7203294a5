"""OpenTelemetry set-up, W3C propagation across the queue, and the decode events.

Configuration is a `TracingSettings` (telemetry/settings.py), which the CLI
edge builds from flags whose defaults are the standard `OTEL_*` variables; the
SDK itself still reads the rest of them (headers, TLS, sampler, batch-processor
timings, resource attributes). Exporting is off unless the settings have an
endpoint (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`): then there is no SDK provider at
all, every span is the API's non-recording span, and the observers skip event
building (`Span.is_recording()`), so an untraced worker pays nothing per round.

Span tree of one request (one trace id across processes):

    gateway  SERVER   dexserve.v1.DexService/Generate   dex.request_id, gen_ai.request.*   (gRPC door)
             or       POST /v1/completions              the same, plus http.* / url.* (HTTP door)
    gateway  PRODUCER send dex:requests                 context injected into QueuedRequest.trace_context
    worker   CONSUMER process dex:requests              parent: the extracted context (single message)
    worker   INTERNAL decode                            events dex.commit / dex.collapse, gen_ai.usage.*

Commit and collapse events are built from the engine's `RoundRecord` only
(`add_round_events`): one event per commit and one per collapse, with ints as
attribute values and no string formatting, which keeps the per-round cost to a
few microseconds per committed token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer

from dexserve.contract.records import FALLBACK, RoundRecord
from dexserve.telemetry.settings import TracingSettings

log = logging.getLogger(__name__)

GATEWAY_SERVICE = "dexserve-gateway"
WORKER_SERVICE = "dexserve-worker"
INSTRUMENTATION = "dexserve"

# ---- span names --------------------------------------------------------------
PRODUCER_SPAN = "send {destination}"
CONSUMER_SPAN = "process {destination}"
DECODE_SPAN = "decode"
COMMIT_EVENT = "dex.commit"
COLLAPSE_EVENT = "dex.collapse"
FIRST_TOKEN_EVENT = "dex.first_token"
DIVERGENCE_EVENT = "dex.divergence"          # a restarted attempt differs from what was sent (stream ABORTED)

# ---- attribute keys (GenAI and messaging semantic conventions, then dex.*) ----
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_MODEL = "gen_ai.request.model"
GEN_AI_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_TOP_P = "gen_ai.request.top_p"
GEN_AI_TOP_K = "gen_ai.request.top_k"
GEN_AI_SEED = "gen_ai.request.seed"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
TEXT_COMPLETION = "text_completion"
CHAT = "chat"

# HTTP server spans (the stable HTTP semantic conventions)
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
CLIENT_ADDRESS = "client.address"
NETWORK_PROTOCOL_VERSION = "network.protocol.version"
USER_AGENT_ORIGINAL = "user_agent.original"
ERROR_TYPE = "error.type"

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"

REQUEST_ID = "dex.request_id"
DOOR = "dex.door"                             # grpc | http: which door of the gateway the call came through
DEX_STATUS = "dex.status"                     # how an HTTP call ended, as a gRPC status name (the one vocabulary)
RPT = "dex.rpt"
EXPLORERS = "dex.explorers"
MODE = "dex.mode"
ATTEMPT = "dex.attempt"
ATTACHED = "dex.attached"
ROUND = "dex.round"
POSITION = "dex.position"
TOKEN_ID = "dex.token_id"
BOUNDARY = "dex.boundary"
NODES_KEPT = "dex.nodes_kept"
NODES_DROPPED = "dex.nodes_dropped"


# ---- set-up --------------------------------------------------------------------
def _exporter(settings: TracingSettings):
    if settings.protocol.startswith("http"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        except ImportError:
            log.warning("OTLP protocol %s needs opentelemetry-exporter-otlp-proto-http; exporting over OTLP/gRPC "
                        "instead", settings.protocol)
        else:
            return HttpExporter(endpoint=settings.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint)


def setup_tracing(settings: TracingSettings, set_global: bool = True):
    """An SDK TracerProvider exporting over OTLP with a BatchSpanProcessor, or
    None when exporting is off (no endpoint). `service.name` is the settings'."""
    if not settings.exporting:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: settings.service_name})
    provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_events=settings.max_events))
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    if set_global:
        trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans of %s over OTLP to %s", resource.attributes.get(SERVICE_NAME),
             settings.endpoint)
    return provider


def get_tracer(provider=None) -> Tracer:
    """The dexserve tracer of `provider`; the API's no-op tracer without one."""
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(INSTRUMENTATION)


def shutdown_tracing(provider) -> None:
    """Flush what the batch processor holds (a process exiting must not lose its last spans)."""
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # exporting is best effort; shutdown must go on
            log.warning("tracing shutdown failed", exc_info=True)


# ---- W3C propagation through the queued message --------------------------------
def inject_context(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write `traceparent` (and `tracestate`) of `context` into the message's map."""
    propagate.inject(carrier, context=context)


def extract_context(carrier: Mapping[str, str]) -> Context:
    """The remote parent a consumer span continues (empty map: a new trace)."""
    return propagate.extract(dict(carrier))


# ---- decode events from the FSM record -------------------------------------------
def add_round_events(spans: Mapping[str, Span], record: RoundRecord) -> int:
    """One `dex.commit` event per commit and one `dex.collapse` per collapse on
    the decode span of each request; returns the events added. Everything is
    read off the record: round, position, token id, boundary (or "fallback"),
    nodes kept and dropped."""
    if not spans:
        return 0
    n = 0
    r = record.round
    for c in record.commits:
        span = spans.get(c.request_id)
        if span is not None:
            span.add_event(COMMIT_EVENT, {ROUND: r, POSITION: c.position, TOKEN_ID: c.token,
                                          BOUNDARY: "fallback" if c.boundary == FALLBACK else c.boundary})
            n += 1
    for k in record.collapses:
        span = spans.get(k.request_id)
        if span is not None:
            span.add_event(COLLAPSE_EVENT, {ROUND: r, POSITION: k.position, NODES_KEPT: k.kept,
                                            NODES_DROPPED: k.dropped})
            n += 1
    return n
