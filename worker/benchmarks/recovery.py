"""Recovery after a killed worker: `python worker/benchmarks/recovery.py [--trials 5] [--out FILE]`.

Redis, the gateway and two workers (the real engine on the shipped model) run as separate processes.
Each trial streams one greedy request through `dexserve.client.stream_generate`, kills the worker
holding it with SIGKILL once `--kill-after` tokens have arrived, and measures **kill → next token on
the client**: the time until a chunk carrying a position the client did not have yet arrives (the
survivor claims the entry after `claim_idle_ms`, finds it in its next XAUTOCLAIM scan, restarts the
request and regenerates the positions already sent, which the gateway skips after checking them).
The stream must end with every position once and the direct engine's tokens. A fresh worker replaces
the victim before the next trial.

`--config NAME=FLAGS` (repeatable) compares queue settings, e.g. the previous defaults
`before="--claim-idle-ms 10000 --claim-interval-ms 5000 --heartbeat-interval 2"` against `after=""`
(today's defaults). Workers run K=4 in one process, eager (`--explorers 4 --no-compile`, 1 thread) unless
`--engine-args` says otherwise (two workers share the two cores):
what is measured is the queue's hand-over, not decoding speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from dexserve.client import stream_generate
from dexserve.queue.embedded import EmbeddedRedis, free_port
from dexserve.queue.protocol import GROUP, QueueNames, consumer_host_prefix

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(description="


def _holder_pid(client: redis.Redis, names: QueueNames) -> int | None:
    prefix = consumer_host_prefix(socket.gethostname())
    for row in client.xpending_range(names.requests, GROUP, "-", "+", 10):
        name = row["consumer"].decode()
        if name.startswith(prefix):
            return int(name[len(prefix):])
    return None


def _wait_workers(client: redis.Redis, names: QueueNames, pids: set[int], timeout: float = 600) -> None:
    prefix = consumer_host_prefix(socket.gethostname())
    deadline = time.monotonic() + timeout
    while True:
        alive = {int(k.decode().rsplit("-", 1)[1]) for k in client.scan_iter(names.workers_pattern())
                 if k.decode().split(":", 2)[2].startswith(prefix)}
        if pids <= alive:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {pids - alive} did not start")
        time.sleep(0.2)


def run_config(name: str, queue_flags: list[str], args, model: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dex-recovery-"))
    server = EmbeddedRedis(tmp / "redis").start()
    names = QueueNames("recovery")
    port = free_port()
    common = ["--redis-url", server.url, "--queue-prefix", names.prefix, *queue_flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    gateway = subprocess.Popen([sys.executable, "-m", "dexserve.cli", "gateway", "--port", str(port), "--http-port",
                                "0", "--model", model, "--log-level", "WARNING", *common], env=env)
    engine = ["--engine", "dex", "--model", model, *shlex.split(args.engine_args)]

    def worker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dexserve.cli", "worker", *engine, "--log-level", "WARNING",
                                 *common], env=env)

    workers = [worker(), worker()]
    client = redis.Redis.from_url(server.url)
    address = f"127.0.0.1:{port}"
    trials = []
    try:
        _wait_workers(client, names, {w.pid for w in workers})
        # warm-up: one stream on each worker (the first round of a fresh process is slow)
        for i in range(2):
            list(stream_generate(address, PROMPT + f"'warm {i}')", max_new_tokens=8, timeout=300))
        reference = None
        for trial in range(args.trials):
            killed_at = next_at = None
            victim = None
            received = 0
            positions: list[int] = []
            ids: list[int] = []
            for chunk in stream_generate(address, PROMPT, max_new_tokens=args.tokens, timeout=300):
                now = time.monotonic()
                if killed_at is not None and next_at is None and chunk.token_ids:
                    next_at = now
                positions.extend(range(chunk.position, chunk.position + len(chunk.token_ids)))
                ids.extend(chunk.token_ids)
                received += len(chunk.token_ids)
                if killed_at is None and received >= args.kill_after:
                    victim = _holder_pid(client, names)
                    os.kill(victim, signal.SIGKILL)
                    killed_at = time.monotonic()
            assert positions == list(range(len(positions))), f"positions {positions}"
            if reference is None:
                reference = ids
            assert ids == reference, "a restarted stream changed its tokens"
            if next_at is None:
                raise RuntimeError(f"trial {trial}: the stream finished before the kill took effect")
            for w in workers:
                if w.pid == victim:
                    w.wait()
            workers = [w for w in workers if w.pid != victim] + [worker()]
            _wait_workers(client, names, {w.pid for w in workers})
            trials.append(round(next_at - killed_at, 3))
            print(f"{name}: trial {trial}: kill -> next token {trials[-1]:.3f} s", flush=True)
    finally:
        for p in [*workers, gateway]:
            p.send_signal(signal.SIGTERM)
        for p in [*workers, gateway]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        client.close()
        server.stop()
    return {"config": name, "queue_flags": " ".join(queue_flags), "trials_s": trials,
            "median_s": round(statistics.median(trials), 3), "min_s": min(trials), "max_s": max(trials)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96, help="max_new_tokens of each stream")
    parser.add_argument("--kill-after", type=int, default=16, help="tokens received before the kill")
    parser.add_argument("--config", action="append", default=[],
                        help="NAME=QUEUE_FLAGS (repeatable; default: after= today's defaults)")
    parser.add_argument("--engine-args", default="--explorers 4 --no-compile --threads 1")
    parser.add_argument("--model", default=None, help="default: the shipped model")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)

    from dexserve.contract.model_card import resolve_model_dir

    model = str(resolve_model_dir(args.model))
    configs = [c.split("=", 1) for c in (args.config or ["after="])]
    results = [run_config(name, shlex.split(flags), args, model) for name, flags in configs]
    report = {"what": "kill -9 of the worker holding a stream -> next new token on the client",
              "tokens": args.tokens, "kill_after": args.kill_after, "engine_args": args.engine_args,
              "cpus": os.cpu_count(), "configs": results}
    print(f"{'config':>8} {'queue flags':>60} {'median s':>9} {'min s':>7} {'max s':>7}  trials")
    for r in results:
        print(f"{r['config']:>8} {r['queue_flags'] or '(defaults)':>60} {r['median_s']:>9} {r['min_s']:>7} "
              f"{r['max_s']:>7}  {r['trials_s']}")
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
