"""`dex gateway`: the gRPC gateway and its OpenAI-compatible HTTP door. Flags and environment → `GatewayConfig`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from dexserve.commands.options import (add_http_arguments, add_limit_arguments, add_queue_arguments,
                                       add_telemetry_arguments, http_port_from_args, limits_from_args, queue_from_args,
                                       telemetry_from_args)
from dexserve.gateway.config import GatewayConfig
from dexserve.telemetry.endpoint import GATEWAY_METRICS_PORT
from dexserve.telemetry.tracing import GATEWAY_SERVICE

HELP = "Run the gateway: gRPC, and the OpenAI-compatible HTTP door beside it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("DEX_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("DEX_PORT", 50051)), help="gRPC port (env DEX_PORT)")
    add_http_arguments(parser)
    parser.add_argument("--model", default=env("DEX_MODEL_DIR") or None,
                        help="checkpoint directory (env DEX_MODEL_DIR; default: the shipped model)")
    parser.add_argument("--auth-token", default=env("DEX_AUTH_TOKEN") or None,
                        help="require `authorization: Bearer TOKEN` on both doors (env DEX_AUTH_TOKEN)")
    parser.add_argument("--tls-cert", default=env("DEX_TLS_CERT") or None,
                        help="PEM certificate chain (TLS on both doors)")
    parser.add_argument("--tls-key", default=env("DEX_TLS_KEY") or None, help="PEM private key")
    parser.add_argument("--log-level", default=env("DEX_LOG_LEVEL", "INFO"))
    parser.add_argument("--no-model-card-check", dest="check_model_card", action="store_false",
                        default=env("DEX_MODEL_CARD_CHECK", "1") not in ("0", "false", "no"),
                        help="do not compare this gateway's model with the card the workers publish "
                             "(env DEX_MODEL_CARD_CHECK=0); on by default: a mismatch refuses to start")
    parser.add_argument("--model-card-wait", type=float, default=float(env("DEX_MODEL_CARD_WAIT_S", 45)),
                        help="seconds to wait for the workers' card to match before refusing to start "
                             "(env DEX_MODEL_CARD_WAIT_S; a rollout's old workers may still hold the key)")
    parser.add_argument("--max-streams", type=int, default=int(env("DEX_MAX_STREAMS", GatewayConfig.max_streams)),
                        help="open Generate/Complete calls this gateway serves at once; one more is "
                             "RESOURCE_EXHAUSTED (env DEX_MAX_STREAMS; sizes the Redis connection pool)")
    parser.add_argument("--require-workers", action="store_true",
                        default=env("DEX_REQUIRE_WORKERS", "0") in ("1", "true", "yes"),
                        help="refuse requests (UNAVAILABLE / HTTP 503) while no worker is running instead of "
                             "queueing them (env DEX_REQUIRE_WORKERS=1); off by default: workers may scale from zero")
    add_limit_arguments(parser)
    add_queue_arguments(parser)
    add_telemetry_arguments(parser, GATEWAY_SERVICE, GATEWAY_METRICS_PORT)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    names, settings = queue_from_args(args)
    return GatewayConfig(redis_url=args.redis_url, host=args.host, port=args.port,
                         http_port=http_port_from_args(args), model=args.model,
                         limits=limits_from_args(args), auth_token=args.auth_token, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, names=names, settings=settings,
                         check_model_card=args.check_model_card, model_card_wait_s=args.model_card_wait,
                         max_streams=args.max_streams,
                         require_workers=args.require_workers)


def run(args: argparse.Namespace) -> int:
    from dexserve.gateway.server import Gateway
    from dexserve.telemetry.process import start_gateway_telemetry

    logging.basicConfig(level=args.log_level, format="%(asctime)s gateway %(levelname)s %(message)s")
    config = config_from_args(args)

    telemetry = start_gateway_telemetry(config, telemetry_from_args(args))

    async def main() -> None:
        from dexserve.gateway.server import ModelMismatch

        try:
            gw = await Gateway.start(config, telemetry.observer)
        except ModelMismatch as exc:
            logging.getLogger("dexserve.gateway").error("refusing to start: %s", exc)
            raise SystemExit(3) from exc
        telemetry.set_ready()
        http = f"; OpenAI HTTP on {gw.http.scheme}://{config.host}:{gw.http_port}/v1" if gw.http else ""
        print(f"dex gateway listening on {config.host}:{gw.port}{http}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gw.stop(5.0)

    try:
        asyncio.run(main())
    finally:
        telemetry.shutdown()
    return 0
