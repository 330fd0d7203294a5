"""Service benchmark: `python worker/benchmarks/service_bench.py [--concurrency 1 10 100] [--json]`.

Isolates the service: workers run the stand-in engine, which commits a token
per request per round with no model behind it, so what is measured is the
queue and the gateway. For each concurrency it reports commit-to-client
latency (worker commit timestamp → chunk received by the client; same host,
same clock) p50/p99 and streamed tokens/s through the gateway. Redis, the
gateway and the workers are separate processes, as in `dex up`.
With `--engine dex` the workers run the real engine on the shipped model
(`--explorers`, `--width`), and time to first token and per-stream tokens/s
are what to read. `--door http` (or `both`) drives the same requests through the
OpenAI-compatible HTTP door with the official `openai` client (streaming,
greedy, `stream_options.include_usage` for the token count): the difference to
`grpc` is what the HTTP layer costs. Commit-to-client latency needs the
commit timestamp, which only gRPC chunks carry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from dexserve.client import build_request
from dexserve.queue.embedded import EmbeddedRedis, free_port
from dexserve.v1 import dex_pb2_grpc


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n"


def _stream_done(t0: int, first: int | None, n: int, ttfts: list[float] | None, rates: list[float] | None) -> int:
    """A stream that began at t0 (ns) and got its first token at `first` ended now with n tokens:
    record its TTFT (ms) and its own tokens/s after the first token."""
    end = time.time_ns()
    if ttfts is not None and first is not None:
        ttfts.append((first - t0) / 1e6)
    if rates is not None and n > 1 and first is not None and end > first:
        rates.append((n - 1) / ((end - first) / 1e9))
    return n


async def _one(stub, i: int, tokens: int, latencies: list[float], ttfts: list[float] | None = None,
               rates: list[float] | None = None) -> int:
    n = 0
    t0 = time.time_ns()
    first = None
    request = build_request(f"{PROMPT}# bench {i} {t0}\n", max_new_tokens=tokens)
    async for chunk in stub.Generate(request, timeout=600):
        now = time.time_ns()
        if chunk.token_ids:
            if first is None:
                first = now
            latencies.extend([(now - chunk.commit_unix_nanos) / 1e6] * len(chunk.token_ids))
            n += len(chunk.token_ids)
    return _stream_done(t0, first, n, ttfts, rates)


async def _one_http(client, i: int, tokens: int, ttfts: list[float] | None = None,
                    rates: list[float] | None = None) -> int:
    t0 = time.time_ns()
    first = None
    n = 0
    stream = await client.completions.create(model="", prompt=f"{PROMPT}# bench {i} {t0}\n", max_tokens=tokens,
                                             temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.time_ns()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return _stream_done(t0, first, n, ttfts, rates)


async def _level(address: str, concurrency: int, tokens: int, door: str = "grpc") -> dict:
    latencies: list[float] = []
    ttfts: list[float] = []
    rates: list[float] = []
    if door == "http":
        import openai

        async with openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="bench", max_retries=0,
                                      timeout=600) as client:
            await _one_http(client, -1, 2)   # warm the path
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(_one_http(client, i, tokens, ttfts, rates) for i in range(concurrency)))
            wall = time.perf_counter() - t0
    else:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = dex_pb2_grpc.DexServiceStub(ch)
            await _one(stub, -1, 2, [])   # warm the path
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(_one(stub, i, tokens, latencies, ttfts, rates)
                                            for i in range(concurrency)))
            wall = time.perf_counter() - t0
    total = sum(counts)
    return {"door": door, "concurrency": concurrency, "streams": concurrency, "tokens": total,
            "seconds": round(wall, 3),
            "tokens_per_s": round(total / wall, 1), "per_stream_tokens_per_s": round(total / wall / concurrency, 1),
            "commit_to_client_ms_p50": round(_percentile(latencies, 0.5), 3) if latencies else None,
            "commit_to_client_ms_p99": round(_percentile(latencies, 0.99), 3) if latencies else None,
            "ttft_ms_p50": round(_percentile(ttfts, 0.5), 2), "ttft_ms_p99": round(_percentile(ttfts, 0.99), 2),
            "stream_tokens_per_s_p50": round(_percentile(rates, 0.5), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--engine", choices=("standin", "dex"), default="standin")
    parser.add_argument("--model", default=None, help="with --engine dex (default: the shipped model)")
    parser.add_argument("--explorers", type=int, default=4)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (--engine dex)")
    parser.add_argument("--door", choices=("grpc", "http", "both"), default="grpc",
                        help="drive the gRPC door, the OpenAI-compatible HTTP door, or both (in turns per level)")
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args(argv)

    from dexserve.worker.standin import write_standin_model

    tmp = Path(tempfile.mkdtemp(prefix="dex-bench-"))
    if args.engine == "standin":
        model = write_standin_model(tmp / "standin-model")
        engine_flags = ["--engine", "standin", "--model", str(model)]
    else:
        from dexserve.contract.model_card import resolve_model_dir

        model = resolve_model_dir(args.model)
        engine_flags = ["--engine", "dex", "--model", str(model), "--explorers", str(args.explorers),
                        "--width", str(args.width), "--threads", str(args.threads)]
    server = EmbeddedRedis(tmp / "redis").start()
    port, http_port = free_port(), free_port()
    common = ["--redis-url", server.url, "--queue-prefix", "bench"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "dexserve.cli", "gateway", "--port", str(port), "--http-port",
                               str(http_port), "--model", str(model), "--log-level", "WARNING", *common], env=env,
                              stdout=subprocess.DEVNULL)]
    procs += [subprocess.Popen([sys.executable, "-m", "dexserve.cli", "worker", *engine_flags,
                                "--max-batch", str(args.max_batch), "--log-level", "WARNING", *common],
                               env=env) for _ in range(args.workers)]
    address = f"127.0.0.1:{port}"
    try:
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=120)
        doors = ("grpc", "http") if args.door == "both" else (args.door,)
        addresses = {"grpc": address, "http": f"127.0.0.1:{http_port}"}
        results = [asyncio.run(_level(addresses[door], c, args.tokens, door))
                   for c in args.concurrency for door in doors]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        server.stop()
    engine = "standin (instant commit)" if args.engine == "standin" else f"dex K={args.explorers} W={args.width}"
    report = {"engine": engine, "tokens_per_stream": args.tokens, "workers": args.workers,
              "cpus": os.cpu_count(), "levels": results}
    if not args.json:
        print(f"{'door':>5} {'streams':>8} {'tokens/s':>10} {'per stream':>11} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'TTFT p50':>9} {'TTFT p99':>9} {'stream tok/s p50':>17}")
        for r in results:
            print(f"{r['door']:>5} {r['concurrency']:>8} {r['tokens_per_s']:>10} {r['per_stream_tokens_per_s']:>11} "
                  f"{r['commit_to_client_ms_p50']:>8} {r['commit_to_client_ms_p99']:>8} {r['ttft_ms_p50']:>9} "
                  f"{r['ttft_ms_p99']:>9} {r['stream_tokens_per_s_p50']:>17}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
