"""Flags and environment every role of a deployment must agree on: the queue
and the serving limits, shared by `dex gateway`, `dex worker` and `dex up`;
and the telemetry flags both long-running processes take.

This is the CLI edge: flags and environment become `QueueNames`,
`QueueSettings`, `Limits` and `TelemetrySettings` here and nowhere else. Flags
win over environment variables, which win over the defaults of those typed
objects.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from dexserve.contract.limits import DEFAULT_LIMITS, Limits
from dexserve.contract.model_card import ModelCard
from dexserve.queue.protocol import HEARTBEATS_PER_CLAIM, QueueNames, QueueSettings
from dexserve.telemetry.settings import (DEFAULT_MAX_EVENTS, DEFAULT_METRICS_HOST, OTLP_PROTOCOLS, TelemetrySettings,
                                         TracingSettings)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HTTP_PORT = 8000     # the OpenAI-compatible HTTP door of `dex gateway` / `dex up`


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    d = QueueSettings()
    g = parser.add_argument_group("queue")
    g.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL), help="env REDIS_URL")
    g.add_argument("--queue-prefix", default=os.environ.get("DEX_QUEUE_PREFIX", "dex"),
                   help="key prefix (env DEX_QUEUE_PREFIX)")
    g.add_argument("--queue-maxlen", type=int, default=_env_int("DEX_QUEUE_MAXLEN", d.maxlen),
                   help="requests queued or in flight before RESOURCE_EXHAUSTED (env DEX_QUEUE_MAXLEN)")
    g.add_argument("--claim-idle-ms", type=int, default=_env_int("DEX_CLAIM_IDLE_MS", d.claim_idle_ms),
                   help="idle time after which a held request is claimed from its (dead) worker "
                        f"(env DEX_CLAIM_IDLE_MS; default {d.claim_idle_ms})")
    g.add_argument("--claim-interval-ms", type=int, default=_env_int("DEX_CLAIM_INTERVAL_MS", d.claim_interval_ms),
                   help="how often a worker with a free slot looks for such requests "
                        f"(env DEX_CLAIM_INTERVAL_MS; default {d.claim_interval_ms})")
    g.add_argument("--heartbeat-interval", type=float,
                   default=float(os.environ.get("DEX_HEARTBEAT_INTERVAL", d.heartbeat_interval_s)),
                   help="seconds between a worker's heartbeats, which keep what it holds from being claimed; "
                        f"at most claim-idle-ms / {HEARTBEATS_PER_CLAIM} "
                        f"(env DEX_HEARTBEAT_INTERVAL; default {d.heartbeat_interval_s})")
    g.add_argument("--max-attempts", type=int, default=_env_int("DEX_MAX_ATTEMPTS", d.max_attempts),
                   help="deliveries before a request is dead-lettered")
    g.add_argument("--token-ttl", type=int, default=_env_int("DEX_TOKEN_TTL_S", d.token_ttl_s))
    g.add_argument("--resume-grace", type=float,
                   default=float(os.environ.get("DEX_RESUME_GRACE_S", d.resume_grace_s)),
                   help="seconds a request keeps running after its last client left, so that a client "
                        "can reconnect and resume it (env DEX_RESUME_GRACE_S; 0: cancel at once)")


def queue_from_args(args: argparse.Namespace) -> tuple[QueueNames, QueueSettings]:
    settings = QueueSettings(
        maxlen=args.queue_maxlen, claim_idle_ms=args.claim_idle_ms, claim_interval_ms=args.claim_interval_ms,
        heartbeat_interval_s=args.heartbeat_interval, max_attempts=args.max_attempts,
        token_ttl_s=args.token_ttl, idempotency_ttl_s=args.token_ttl, resume_grace_s=args.resume_grace,
        heartbeat_ttl_s=max(2, int(args.heartbeat_interval * 5)))
    return QueueNames(args.queue_prefix), settings


def queue_flags(args: argparse.Namespace) -> list[str]:
    """The same settings as flags, for processes `dex up` starts."""
    return ["--redis-url", args.redis_url, "--queue-prefix", args.queue_prefix,
            "--queue-maxlen", str(args.queue_maxlen), "--claim-idle-ms", str(args.claim_idle_ms),
            "--claim-interval-ms", str(args.claim_interval_ms),
            "--heartbeat-interval", str(args.heartbeat_interval), "--max-attempts", str(args.max_attempts),
            "--token-ttl", str(args.token_ttl), "--resume-grace", str(args.resume_grace)]


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serving limits (the gateway and every worker must agree)")
    g.add_argument("--max-context", type=int, default=_env_int("DEX_MAX_CONTEXT", 0),
                   help="positions per request, prompt + generated (env DEX_MAX_CONTEXT; default 0 = the "
                        "model's own max_position_embeddings)")
    g.add_argument("--max-new-tokens-limit", type=int,
                   default=_env_int("DEX_MAX_NEW_TOKENS", DEFAULT_LIMITS.max_new_tokens),
                   help="largest max_new_tokens a request may ask for (env DEX_MAX_NEW_TOKENS)")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """`--max-context 0`: the context of the model in `--model` (gateway and workers read the same
    card, so they agree; `dex up` passes 0 on to each)."""
    context = args.max_context
    if context == 0:
        context = ModelCard.load(getattr(args, "model", None)).max_position_embeddings
    return Limits(max_context=context, max_new_tokens=args.max_new_tokens_limit)


def limit_flags(args: argparse.Namespace) -> list[str]:
    """The same limits as flags, for processes `dex up` starts."""
    return ["--max-context", str(args.max_context), "--max-new-tokens-limit", str(args.max_new_tokens_limit)]


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-port", type=int, default=_env_int("DEX_HTTP_PORT", DEFAULT_HTTP_PORT),
                        help="port of the OpenAI-compatible HTTP door (/v1/completions, /v1/chat/completions, "
                             f"/v1/models, /health) beside gRPC; 0 turns it off (env DEX_HTTP_PORT; "
                             f"default {DEFAULT_HTTP_PORT})")


def http_port_from_args(args: argparse.Namespace) -> int | None:
    """`--http-port 0` means no HTTP door (None in `GatewayConfig`)."""
    return args.http_port or None


def http_flags(args: argparse.Namespace) -> list[str]:
    """The same setting as a flag, for the gateway `dex up` starts."""
    return ["--http-port", str(args.http_port)]


# ---- telemetry (`dex gateway`, `dex worker`) -------------------------------------------------------

_OFF = ("", "off", "none", "-1")


def _port_or_off(raw: str) -> int | None:
    raw = raw.strip().lower()
    if raw in _OFF:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number, or off; got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port number (0..65535), or off; got {port}")
    return port


def otlp_protocol_from_env(env: Mapping[str, str]) -> str:
    """OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else grpc."""
    return (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc").strip().lower()


def otlp_endpoint_from_env(env: Mapping[str, str], protocol: str) -> str | None:
    """The traces endpoint the standard variables name, or None (exporting off): none set, or
    OTEL_SDK_DISABLED=true, or OTEL_TRACES_EXPORTER=none. OTEL_EXPORTER_OTLP_ENDPOINT is a base
    URL: over http/protobuf the traces path is appended, as the OpenTelemetry spec says."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    if traces := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base and protocol.startswith("http"):
        return base.rstrip("/") + "/v1/traces"
    return base or None


def add_telemetry_arguments(parser: argparse.ArgumentParser, service: str, metrics_port: int) -> None:
    """Tracing and the metrics port; every default is the environment variable users already set
    (the standard OTEL_* ones included)."""
    env = os.environ.get
    g = parser.add_argument_group("telemetry (defaults: the standard OTEL_* environment)")
    g.add_argument("--metrics-port", type=_port_or_off, default=env("DEX_METRICS_PORT", str(metrics_port)),
                   help=f"Prometheus /metrics and /healthz port (env DEX_METRICS_PORT; default {metrics_port}; "
                        f"off: none; taken: a free one)")
    g.add_argument("--metrics-host", default=env("DEX_METRICS_HOST", DEFAULT_METRICS_HOST),
                   help=f"address the metrics port listens on (env DEX_METRICS_HOST; default {DEFAULT_METRICS_HOST})")
    g.add_argument("--otlp-endpoint", default=None,
                   help="OTLP collector for traces, e.g. http://otel-collector:4317 (default: "
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT; none, "
                        "OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none: no spans; off: none either)")
    g.add_argument("--otlp-protocol", choices=OTLP_PROTOCOLS, default=None,
                   help="OTLP transport (default: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else "
                        "OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)")
    g.add_argument("--service-name", default=env("OTEL_SERVICE_NAME") or service,
                   help=f"service.name of this process's spans (env OTEL_SERVICE_NAME; default {service})")
    g.add_argument("--span-event-limit", type=int, default=int(env("OTEL_SPAN_EVENT_COUNT_LIMIT") or DEFAULT_MAX_EVENTS),
                   help=f"events kept per span: a commit and a collapse per token (env OTEL_SPAN_EVENT_COUNT_LIMIT; "
                        f"default {DEFAULT_MAX_EVENTS})")


def telemetry_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> TelemetrySettings:
    protocol = args.otlp_protocol or otlp_protocol_from_env(env)
    if protocol not in OTLP_PROTOCOLS:
        raise SystemExit(f"OTEL_EXPORTER_OTLP_PROTOCOL: one of {', '.join(OTLP_PROTOCOLS)}, got {protocol!r}")
    endpoint = args.otlp_endpoint if args.otlp_endpoint is not None else otlp_endpoint_from_env(env, protocol)
    if endpoint is not None and endpoint.strip().lower() in _OFF:
        endpoint = None
    tracing = TracingSettings(service_name=args.service_name, endpoint=endpoint, protocol=protocol,
                              max_events=args.span_event_limit)
    return TelemetrySettings(tracing, metrics_port=args.metrics_port, metrics_host=args.metrics_host)

