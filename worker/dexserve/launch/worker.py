"""`dex worker`: one worker process.
Flags and environment → `WorkerSettings`; `run_worker` takes only that."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from dexserve.commands.options import add_queue_arguments, add_telemetry_arguments, queue_from_args, telemetry_from_args
from dexserve.launch.engine_options import add_engine_arguments as add_dex_engine_arguments
from dexserve.launch.engine_options import compile_notice, engine_config
from dexserve.launch.engine_options import engine_flags as dex_engine_flags
from dexserve.kube.pod_guard import PodRef
from dexserve.telemetry.endpoint import WORKER_METRICS_PORT
from dexserve.telemetry.tracing import WORKER_SERVICE
from dexserve.worker.settings import StandinOptions, WorkerSettings

HELP = "Run one worker process."
log = logging.getLogger("dexserve.worker")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags (shared with `dex generate/bench/up`) plus the worker's engine choice."""
    add_dex_engine_arguments(parser)
    g = parser.add_argument_group("engine choice")
    g.add_argument("--engine", choices=("dex", "standin"), default=os.environ.get("DEX_ENGINE", "dex"))
    g.add_argument("--standin-delay", type=float, default=0.0, help="stand-in engine: seconds per round")
    g.add_argument("--standin-poison", default=None, help="stand-in engine: prompts containing this fail")
    g.add_argument("--standin-no-logprobs", dest="standin_logprobs", action="store_false",
                   help="stand-in engine: report no log-probabilities (as an engine without them)")


def engine_flags(args: argparse.Namespace) -> list[str]:
    """argv reproducing the engine flags for a worker process (used by `dex up`)."""
    flags = ["--engine", args.engine, *dex_engine_flags(args)]
    if args.engine == "standin" and args.standin_delay:
        flags += ["--standin-delay", str(args.standin_delay)]
    if args.standin_poison:
        flags += ["--standin-poison", args.standin_poison]
    if not args.standin_logprobs:
        flags += ["--standin-no-logprobs"]
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_queue_arguments(parser)
    parser.add_argument("--consumer", default=None, help="consumer name in the group (default host-pid)")
    parser.add_argument("--grace", type=float, default=float(os.environ.get("DEX_SHUTDOWN_GRACE_S", 30)),
                        help="seconds to finish held requests after SIGTERM before handing them back")
    parser.add_argument("--log-level", default=os.environ.get("DEX_LOG_LEVEL", "INFO"))
    add_telemetry_arguments(parser, WORKER_SERVICE, WORKER_METRICS_PORT)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    names, queue = queue_from_args(args)
    extra = {"consumer": args.consumer} if args.consumer else {}
    return WorkerSettings(model=args.model, engine=args.engine, engine_config=engine_config(args),
                          standin=StandinOptions(args.standin_delay, args.standin_poison, args.standin_logprobs),
                          redis_url=args.redis_url,
                          names=names, queue=queue, grace_s=args.grace, log_level=args.log_level,
                          telemetry=telemetry_from_args(args), pod=PodRef.from_env(os.environ), **extra)


def run(args: argparse.Namespace) -> int:
    return run_worker(settings_from_args(args))


def run_worker(settings: WorkerSettings) -> int:
    import redis

    from dexserve.contract.model_card import card_json
    from dexserve.queue.consumer import WorkerQueue
    from dexserve.queue.protocol import TRANSIENT
    from dexserve.telemetry.process import start_worker_telemetry
    from dexserve.worker.engines import make_engine
    from dexserve.worker.loop import Worker, default_pod_guard

    logging.basicConfig(level=settings.log_level, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    telemetry = start_worker_telemetry(settings.telemetry)   # /healthz is 503 until the engine has loaded
    if settings.engine == "dex" and (notice := compile_notice(settings.engine_config)):
        log.info("worker %s loading the engine: %s", settings.consumer, notice)
    engine = make_engine(settings)
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
    queue = WorkerQueue(client, settings.names, settings.queue, settings.consumer,
                        model_card=card_json(engine.card, engine.limits, logprobs=engine.info.logprobs))
    try:
        queue.heartbeat([])                              # publishes the card now; every heartbeat refreshes it
    except TRANSIENT as exc:                             # Redis down at start: the loop reconnects
        log.warning("redis unavailable at start (%s); the heartbeat publishes the card once it is back", exc)
    worker = Worker(engine, queue,
                    observer=telemetry.observer(engine, settings.names), pod_guard=default_pod_guard(settings.pod),
                    grace_s=settings.grace_s)
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    telemetry.set_ready()
    info = engine.info
    log.info("worker %s ready (engine %s, K=%d %s, batch %d, width %d, context %d; queue %s)", settings.consumer,
             settings.engine, info.explorers, info.executor or "-", info.max_batch, info.width, engine.limits.max_context,
             settings.names.requests)
    try:
        return worker.run()
    finally:
        try:
            engine.close()   # explorer processes stop with their worker, not at interpreter exit
        finally:
            telemetry.shutdown()
