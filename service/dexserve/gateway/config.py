"""`dex gateway` flags and environment → GatewayConfig (what tests build directly)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from dexserve.queue.config import add_queue_arguments, queue_from_args
from dexserve.queue.protocol import QueueNames, QueueSettings


@dataclass
class GatewayConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 50051                      # 0 = any free port
    model: str | None = None               # checkpoint dir; None = the shipped model
    max_context: int = 512                 # must equal the workers' engine max_context
    max_new_tokens: int = 1024             # must equal the workers' engine max_new_tokens
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    names: QueueNames = field(default_factory=QueueNames)
    settings: QueueSettings = field(default_factory=QueueSettings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("DEX_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("DEX_PORT", 50051)))
    parser.add_argument("--model", default=env("DEX_MODEL_DIR") or None,
                        help="checkpoint directory (env DEX_MODEL_DIR; default: the shipped model)")
    parser.add_argument("--max-context", type=int, default=int(env("DEX_MAX_CONTEXT", 512)))
    parser.add_argument("--max-new-tokens-limit", type=int, default=int(env("DEX_MAX_NEW_TOKENS", 1024)),
                        help="largest max_new_tokens a request may ask (env DEX_MAX_NEW_TOKENS)")
    parser.add_argument("--auth-token", default=env("DEX_AUTH_TOKEN") or None,
                        help="require `authorization: Bearer TOKEN` (env DEX_AUTH_TOKEN)")
    parser.add_argument("--tls-cert", default=env("DEX_TLS_CERT") or None, help="PEM certificate chain")
    parser.add_argument("--tls-key", default=env("DEX_TLS_KEY") or None, help="PEM private key")
    parser.add_argument("--log-level", default=env("DEX_LOG_LEVEL", "INFO"))
    add_queue_arguments(parser)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    names, settings = queue_from_args(args)
    return GatewayConfig(redis_url=args.redis_url, host=args.host, port=args.port, model=args.model,
                         max_context=args.max_context, max_new_tokens=args.max_new_tokens_limit, auth_token=args.auth_token, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, names=names, settings=settings)
