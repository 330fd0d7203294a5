"""Flags and environment every role of a deployment must agree on: the queue
and the serving limits, shared by `dex gateway`, `dex worker` and `dex up`.

This is the CLI edge: flags and environment become `QueueNames`,
`QueueSettings` and `Limits` here and nowhere else. Flags win over
environment variables, which win over the defaults of those typed objects.
"""

from __future__ import annotations

import argparse
import os

from dexserve.contract.limits import DEFAULT_LIMITS, Limits
from dexserve.contract.model_card import ModelCard
from dexserve.queue.protocol import QueueNames, QueueSettings

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
                   help="idle time after which a held request is claimed from its (dead) worker")
    g.add_argument("--heartbeat-interval", type=float,
                   default=float(os.environ.get("DEX_HEARTBEAT_INTERVAL", d.heartbeat_interval_s)))
    g.add_argument("--max-attempts", type=int, default=_env_int("DEX_MAX_ATTEMPTS", d.max_attempts),
                   help="deliveries before a request is dead-lettered")
    g.add_argument("--token-ttl", type=int, default=_env_int("DEX_TOKEN_TTL_S", d.token_ttl_s))
    g.add_argument("--resume-grace", type=float,
                   default=float(os.environ.get("DEX_RESUME_GRACE_S", d.resume_grace_s)),
                   help="seconds a request keeps running after its last client left, so that a client "
                        "can reconnect and resume it (env DEX_RESUME_GRACE_S; 0: cancel at once)")


def queue_from_args(args: argparse.Namespace) -> tuple[QueueNames, QueueSettings]:
    settings = QueueSettings(
        maxlen=args.queue_maxlen, claim_idle_ms=args.claim_idle_ms,
        heartbeat_interval_s=args.heartbeat_interval, max_attempts=args.max_attempts,
        token_ttl_s=args.token_ttl, idempotency_ttl_s=args.token_ttl, resume_grace_s=args.resume_grace,
        heartbeat_ttl_s=max(2, int(args.heartbeat_interval * 5)))
    return QueueNames(args.queue_prefix), settings


def queue_flags(args: argparse.Namespace) -> list[str]:
    """The same settings as flags, for processes `dex up` starts."""
    return ["--redis-url", args.redis_url, "--queue-prefix", args.queue_prefix,
            "--queue-maxlen", str(args.queue_maxlen), "--claim-idle-ms", str(args.claim_idle_ms),
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
