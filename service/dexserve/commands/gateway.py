"""`dex gateway`: the gRPC gateway (flags in dexserve.gateway.config)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from dexserve.gateway.config import add_arguments, config_from_args

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from dexserve.gateway.server import Gateway
    from dexserve.telemetry.process import start_gateway_telemetry

    logging.basicConfig(level=args.log_level, format="%(asctime)s gateway %(levelname)s %(message)s")
    config = config_from_args(args)

    telemetry = start_gateway_telemetry(config)

    async def main() -> None:
        gw = await Gateway.start(config, telemetry.observer)
        telemetry.set_ready()
        print(f"dex gateway listening on {config.host}:{gw.port}", flush=True)
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
