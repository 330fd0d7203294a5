"""What tracing costs decoding: the real engine with decode-span events on vs off.

    python worker/benchmarks/tracing_overhead.py --model DIR [--repeats 5] [--json out.json]

Each run decodes the same batch of requests (greedy, EOS ignored, so every
run does identical work) through `WorkerTelemetry`, the observer the worker
uses, with the same metrics in both arms:

- off: no SDK provider (what a worker without OTEL_EXPORTER_OTLP_ENDPOINT runs);
- on:  an SDK provider with a BatchSpanProcessor exporting over OTLP/gRPC to
       an in-process receiver (serialisation, export and the receiver's
       parsing all compete for the same cores as decoding).

Arms alternate (off/on, then on/off, ...) to cancel drift on a shared machine;
the overhead is the ratio of median run times, and, measured directly, the
share of decode time spent in the observer's hooks with tracing on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry

from dexserve.telemetry import tracing
from dexserve.telemetry.metrics import WorkerMetrics
from dexserve.telemetry.receiver import OtlpReceiver
from dexserve.telemetry.settings import TracingSettings
from dexserve.telemetry.worker_observer import WorkerTelemetry

PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "# parse a CSV file\n", "async def fetch(url):", "x = [", "return ")


@dataclass
class Run:
    arm: str
    seconds: float
    tokens: int
    rounds: int
    observer_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def decode_batch(engine, observer: WorkerTelemetry, n: int, max_new_tokens: int, tag: str) -> Run:
    """One batch through engine + observer, hooks called as the worker loop calls them."""
    from dexserve.contract.request import GenerationRequest
    from dexserve.v1 import dex_pb2 as pb

    obs_s = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        rid = f"{tag}-{i}"
        prompt = PROMPTS[i % len(PROMPTS)]
        engine.add(GenerationRequest(rid, prompt, max_new_tokens, ignore_eos=True))
        q = pb.QueuedRequest(request_id=rid, enqueued_unix_ms=int(time.time() * 1000),
                             request=pb.GenerateRequest(request_id=rid, prompt=prompt, max_new_tokens=max_new_tokens))
        a = time.perf_counter()
        observer.on_request_start(q, 1)
        obs_s += time.perf_counter() - a
    tokens = rounds = 0
    while engine.active:
        res = engine.step()
        tokens += len(res.tokens)
        rounds += 1
        a = time.perf_counter()
        observer.on_round(res.record, res.tokens, res.finished, 0.0)
        for fin in res.finished:
            observer.on_request_finish(fin.request_id, fin)
        obs_s += time.perf_counter() - a
    return Run(tag.split("-")[0], time.perf_counter() - t0, tokens, rounds, obs_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python worker/benchmarks/tracing_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the shipped model)")
    p.add_argument("--explorers", type=int, default=4)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="requests decoded together per run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="runs per arm")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: no OpenMP spin contention with other work on a shared machine)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    import torch

    from dexserve.engine.engine import DexEngine, EngineConfig

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    engine = DexEngine.load(args.model, EngineConfig(explorers=args.explorers, width=args.width, max_batch=args.batch,
                                                  max_context=args.max_context, max_new_tokens=args.max_new_tokens))
    receiver = OtlpReceiver(keep_raw=False).start()
    provider = tracing.setup_tracing(TracingSettings("dexserve-bench", endpoint=receiver.endpoint), set_global=False)
    metrics = WorkerMetrics(CollectorRegistry())
    arms = {"off": WorkerTelemetry.for_engine(engine.info, None, metrics, None),
            "on": WorkerTelemetry.for_engine(engine.info, tracing.get_tracer(provider), metrics, None)}

    decode_batch(engine, arms["on"], args.batch, args.max_new_tokens, "warmup-0")   # caches, allocator, exporter
    runs: list[Run] = []
    for r in range(args.repeats):
        for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
            runs.append(decode_batch(engine, arms[arm], args.batch, args.max_new_tokens, f"{arm}-{r}"))
    provider.force_flush()
    tracing.shutdown_tracing(provider)
    receiver.stop()

    def summary(arm: str) -> dict:
        rs = [x for x in runs if x.arm == arm]
        return {"median_seconds": statistics.median(x.seconds for x in rs),
                "median_tokens_per_second": statistics.median(x.tokens_per_second for x in rs),
                "observer_share": sum(x.observer_seconds for x in rs) / sum(x.seconds for x in rs),
                "tokens_per_run": rs[0].tokens, "rounds_per_run": rs[0].rounds}

    off, on = summary("off"), summary("on")
    events = sum(len(s.events) for s in receiver.spans)
    result = {
        "model": str(engine.card.path), "explorers": args.explorers, "width": args.width, "batch": args.batch,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
        "off": off, "on": on,
        "overhead_pct": 100 * (on["median_seconds"] / off["median_seconds"] - 1),
        "hook_overhead_pct": 100 * (on["observer_share"] - off["observer_share"]),
        "exported": {"spans": len(receiver.spans), "events": events, "exports": receiver.exports,
                     "bytes": receiver.bytes},
        "runs": [asdict(x) for x in runs],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print()
    print(f"{'arm':<5} {'median s/run':>13} {'tokens/s':>10} {'hooks % of decode':>18}")
    for name, s in (("off", off), ("on", on)):
        print(f"{name:<5} {s['median_seconds']:>13.4f} {s['median_tokens_per_second']:>10.1f} "
              f"{100 * s['observer_share']:>17.3f}%")
    print(f"tracing overhead: {result['overhead_pct']:+.2f}% wall (median runs), "
          f"{result['hook_overhead_pct']:+.3f}% in the hooks; exported {len(receiver.spans)} spans, {events} events")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
