"""`dex worker` flags (and `python -m dexserve.worker`): flags → the objects tests build directly."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

import redis

from dexserve.queue.config import add_queue_arguments, queue_from_args
from dexserve.queue.consumer import WorkerQueue
from dexserve.worker.engines import make_engine
from dexserve.worker.loop import Worker, default_pod_guard

log = logging.getLogger("dexserve.worker")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags (shared with `dex generate/bench/up`) plus the worker's engine choice."""
    from dexserve.commands.engine_options import add_engine_arguments as add_dex_engine_arguments

    add_dex_engine_arguments(parser)
    g = parser.add_argument_group("engine choice")
    g.add_argument("--engine", choices=("dex", "standin"), default=os.environ.get("DEX_ENGINE", "dex"))
    g.add_argument("--standin-delay", type=float, default=0.0, help="stand-in engine: seconds per round")
    g.add_argument("--standin-poison", default=None, help="stand-in engine: prompts containing this fail")


def engine_flags(args: argparse.Namespace) -> list[str]:
    """argv reproducing the engine flags for a worker process (used by `dex up`)."""
    from dexserve.commands.engine_options import engine_flags as dex_engine_flags

    flags = ["--engine", args.engine, *dex_engine_flags(args)]
    if args.engine == "standin" and args.standin_delay:
        flags += ["--standin-delay", str(args.standin_delay)]
    if args.standin_poison:
        flags += ["--standin-poison", args.standin_poison]
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_queue_arguments(parser)
    parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}",
                        help="consumer name in the group (default host-pid)")
    parser.add_argument("--grace", type=float, default=float(os.environ.get("DEX_SHUTDOWN_GRACE_S", 30)),
                        help="seconds to finish held requests after SIGTERM before handing them back")
    parser.add_argument("--log-level", default=os.environ.get("DEX_LOG_LEVEL", "INFO"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    from dexserve.telemetry.process import start_worker_telemetry

    telemetry = start_worker_telemetry()       # /healthz is 503 until the engine has loaded
    names, settings = queue_from_args(args)
    engine = make_engine(args)
    client = redis.Redis.from_url(args.redis_url, health_check_interval=30)
    worker = Worker(engine, WorkerQueue(client, names, settings, args.consumer),
                    observer=telemetry.observer(engine, names), pod_guard=default_pod_guard(), grace_s=args.grace)
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    telemetry.set_ready()
    log.info("worker %s ready (engine %s, queue %s)", args.consumer, args.engine, names.requests)
    try:
        return worker.run()
    finally:
        telemetry.shutdown()
