"""`dex up` local autoscaling: a burst raises the worker count on consumer-group
lag, idleness lowers it back to the minimum, and every request of the burst
ends with exactly its tokens (none dropped or repeated across scale-down).

Uses the stand-in engine (the engine does not matter here; the processes,
the queue and the lag signal do) with tight `--scale-interval` and
`--scale-down-after`, so the whole run takes ~30 s. The burst ends with a
few long requests, queued last: they are still running when the lag has
been 0 long enough to scale down, so workers are removed while requests are
in flight (`dex up` removes only workers holding nothing; a removed one
drains), and those streams must still be exact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from dexserve.client import stream_generate
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.queue.embedded import free_port
from dexserve.queue.protocol import GROUP, QueueNames
from dexserve.v1 import dex_pb2 as pb
from dexserve.worker.standin import InstantEngine

from .helpers import collect, run_direct

BURST = 14                 # short concurrent streams; 1 worker × max-batch 2 leaves 12 lagging
TOKENS = 40                # per short stream; at 0.04 s a round one batch takes ~1.6 s
LONG, LONG_TOKENS = 2, 200  # queued last, ≥ 8 s each: still running during scale-down
WORKERS_RE = re.compile(r"autoscale: workers=(\d+) lag=(\d+) \((\w+)\)")


class UpProcess:
    """`dex up` as a subprocess whose stdout is read by a thread (so it never blocks)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n{self.output()}")

    def scale_events(self) -> list[tuple[int, int, str]]:
        return [(int(m[1]), int(m[2]), m[3]) for m in map(WORKERS_RE.search, list(self.lines)) if m]

    def output(self) -> str:
        return "".join(self.lines)[-6000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def live_workers(client: redis.Redis, names: QueueNames) -> int:
    """Workers whose heartbeat key exists: the count as Redis sees it, independent of up's log."""
    return len(list(client.scan_iter(names.workers_pattern())))


@pytest.fixture
def up_autoscaling(standin_model: Path, tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["DEX_SHUTDOWN_GRACE_S"] = "5"      # a removed worker that raced for a request drains it
    up = UpProcess([sys.executable, "-m", "dexserve.cli", "up", "--engine", "standin", "--model", str(standin_model),
                    "--port", str(port), "--min-workers", "1", "--max-workers", "3", "--max-batch", "2",
                    "--standin-delay", "0.04", "--scale-interval", "0.3", "--scale-down-after", "2",
                    "--data-dir", str(tmp_path / "redis")], env)
    try:
        yield up, f"127.0.0.1:{port}"
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def expected_tokens(model: Path, prompt: str, n: int) -> list[int]:
    """What the stand-in engine emits for `prompt`, run directly (no service)."""
    engine = InstantEngine.load(str(model), max_batch=1)
    return run_direct(engine, GenerationRequest("x", prompt, n, SamplingParams()))[0]


def test_burst_scales_up_then_idle_scales_down_without_losing_requests(up_autoscaling, standin_model):
    up, address = up_autoscaling
    up.wait_line(r"serving on .* with 1 worker\(s\) \(autoscale 1\.\.3\)", 60)
    redis_url = up.wait_line(r"^redis\s+(\S+)", 5)[1]
    client = redis.Redis.from_url(redis_url)
    names = QueueNames("dex")
    deadline = time.monotonic() + 60
    while live_workers(client, names) < 1:            # the first worker's loop runs
        assert time.monotonic() < deadline, up.output()
        time.sleep(0.1)
    with grpc.insecure_channel(address) as ch:         # the gateway listens
        grpc.channel_ready_future(ch).result(timeout=30)

    lengths = {f"def burst_{i}(x):": TOKENS for i in range(BURST)} | {f"def long_{i}(y):": LONG_TOKENS
                                                                      for i in range(LONG)}
    want = {p: expected_tokens(standin_model, p, n) for p, n in lengths.items()}
    peak = 0

    def one(prompt: str):
        return collect(stream_generate(address, prompt, max_new_tokens=lengths[prompt],
                                       request_id=uuid.uuid4().hex, timeout=90))

    with ThreadPoolExecutor(len(lengths)) as pool:
        futures = {}
        for p in lengths:                  # in order: the long ones are queued last
            futures[p] = pool.submit(one, p)
            time.sleep(0.01)
        downs_in_flight = 0
        while not all(f.done() for f in futures.values()):
            peak = max(peak, live_workers(client, names))
            downs_in_flight = sum(kind == "down" for _, _, kind in up.scale_events())
            time.sleep(0.1)
        results = {p: f.result() for p, f in futures.items()}

    events = up.scale_events()
    assert max(n for n, _, _ in events) == 3, up.output()     # the burst drove it to --max-workers
    assert peak >= 2, f"at most {peak} worker heartbeats seen during the burst"
    for p, (ids, _text, positions, reason) in results.items():
        assert ids == want[p], p                                 # exact tokens, none lost
        assert positions == list(range(lengths[p])), p           # each position once: nothing repeated
        assert reason == pb.FINISH_REASON_LENGTH

    assert downs_in_flight >= 1, "no scale-down while requests were in flight:\n" + up.output()

    # Idle: lag stays 0, so one worker goes per --scale-down-after until the minimum.
    deadline = time.monotonic() + 20
    while not (up.scale_events()[-1][:2] == (1, 0) and live_workers(client, names) == 1):
        assert time.monotonic() < deadline, up.output()      # drained workers leave (heartbeat key removed)
        time.sleep(0.1)
    time.sleep(2.5)                                         # and it stays at the floor
    assert up.scale_events()[-1][:2] == (1, 0) and all(n >= 1 for n, _, _ in up.scale_events())
    assert live_workers(client, names) == 1
    assert client.xpending(names.requests, GROUP)["pending"] == 0       # nothing left held
    # After scale-down a request is still served (the remaining worker is live).
    first = next(iter(lengths))
    assert one(first)[0] == want[first]
    client.close()


def test_scale_to_zero_wakes_on_a_single_message(standin_model: Path, tmp_path: Path):
    """--min-workers 0: nothing runs while idle; one queued request is lag 1,
    which starts a worker, and the request completes exactly."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    up = UpProcess([sys.executable, "-m", "dexserve.cli", "up", "--engine", "standin", "--model", str(standin_model),
                    "--port", str(port), "--workers", "0", "--min-workers", "0", "--max-workers", "1", "--scale-interval", "0.3",
                    "--scale-down-after", "1", "--data-dir", str(tmp_path / "redis")], env)
    try:
        up.wait_line(r"serving on .* with 0 worker\(s\) \(autoscale 0\.\.1\)", 60)
        client = redis.Redis.from_url(up.wait_line(r"^redis\s+(\S+)", 5)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:      # the gateway listens
            grpc.channel_ready_future(ch).result(timeout=30)
        time.sleep(1.0)
        assert live_workers(client, QueueNames("dex")) == 0       # scaled to zero: no worker runs
        prompt = "def wake(x):"
        ids, _text, positions, reason = collect(stream_generate(f"127.0.0.1:{port}", prompt, max_new_tokens=12,
                                                                timeout=90))
        assert ids == expected_tokens(standin_model, prompt, 12)
        assert positions == list(range(12))
        assert any(kind == "up" and n == 1 for n, _, kind in up.scale_events()), up.output()
        up.wait_line(r"autoscale: workers=0 lag=0 \(down\)", 30)   # idle again: back to zero
    finally:
        assert up.stop() == 0, up.output()
