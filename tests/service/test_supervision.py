"""Process faults with real processes: a Redis restart under a running worker (it reconnects and
finishes the stream exactly, no exit), `dex up` replacing a worker killed with -9, and `dex up`
with autoscaling surviving its Redis going away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from dexserve.client import stream_generate
from dexserve.contract.request import GenerationRequest
from dexserve.queue.embedded import EmbeddedRedis, free_port
from dexserve.worker.standin import InstantEngine

from .helpers import collect, run_direct


def _direct(model, prompt, n):
    return run_direct(InstantEngine.load(str(model)), GenerationRequest("d", prompt, n))


def test_worker_survives_a_redis_restart_and_finishes_the_stream(make_gateway, workers, names, tmp_path,
                                                                  standin_model):
    server = EmbeddedRedis(tmp_path / "aof-redis", appendfsync="always").start()
    try:
        gw = make_gateway(redis_url=server.url)
        worker = workers.start("--standin-delay", "0.1", url=server.url)
        client = redis.Redis.from_url(server.url)
        workers.wait_ready(client, 1)
        client.close()
        result: dict[str, object] = {}

        def stream():
            try:
                result["ok"] = collect(stream_generate(gw.address, "while True:", max_new_tokens=40, timeout=90))
            except Exception as exc:  # reported below
                result["error"] = exc

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.0)                               # a few tokens out
        server.stop(kill=True)                        # crash: only the AOF survives
        time.sleep(2.0)                               # down for a while: the worker retries with backoff
        assert worker.poll() is None, f"the worker exited when Redis went away:\n{workers.logs()}"
        server.start()
        t.join(90)
        assert "error" not in result, result.get("error")
        ids, text, positions, _ = result["ok"]
        assert positions == list(range(40))
        assert (ids, text) == _direct(standin_model, "while True:", 40)[:2]
        # a request enqueued after the restart is served by the same worker process
        after = collect(stream_generate(gw.address, "after restart", max_new_tokens=5, timeout=60))
        assert (after[0], after[1]) == _direct(standin_model, "after restart", 5)[:2]
        assert worker.poll() is None and len(workers.procs) == 1
        assert "redis unavailable" in workers.logs() and "reachable again" in workers.logs()
    finally:
        workers.stop_all()
        server.stop()


class Up:
    """`dex up` as a subprocess with its output collected line by line."""

    def __init__(self, model: Path, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dexserve.cli", "up", "--engine", "standin", "--model", str(model), "--port",
             str(self.port), "--data-dir", str(tmp_path / "redis"), "--claim-idle-ms", "1000",
             "--heartbeat-interval", "0.2", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("serving on", 60)
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = [l for l in self.lines if needle in l]
            if hit:
                return hit[-1]
            assert self.proc.poll() is None, f"dex up exited:\n{self.output()}"
            time.sleep(0.1)
        raise AssertionError(f"no {needle!r} in:\n{self.output()}")

    def worker_pids(self) -> list[int]:
        return self.children(b"worker")

    def children(self, role: bytes) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and role in cmd:
                found.append(int(stat.parent.name))
        return found

    def redis_pid(self) -> int:
        line = self.wait_for("redis ", 5)
        return int(line.split("pid ")[1].split(",")[0])

    def serve(self, prompt: str, n: int, timeout: float = 60) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return collect(stream_generate(self.address, prompt, max_new_tokens=n, timeout=20))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)          # the gateway may still be starting

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self._reader.join(5)


def test_dex_up_replaces_a_worker_killed_with_minus_9(standin_model, tmp_path):
    up = Up(standin_model, tmp_path, "--workers", "2")
    try:
        assert up.serve("hello", 4)[2] == [0, 1, 2, 3]
        deadline = time.monotonic() + 30
        while len(pids := up.worker_pids()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        up.wait_for(f"supervise: worker pid {victim} exited (-9)", 10)
        up.wait_for("supervise: started worker pid", 15)
        deadline = time.monotonic() + 30
        while not (len(now := up.worker_pids()) == 2 and victim not in now):
            assert time.monotonic() < deadline, f"{now}\n{up.output()}"
            time.sleep(0.1)
        for i in range(3):
            ids, text, positions, _ = up.serve(f"after kill {i}", 5)
            assert (ids, text) == _direct(standin_model, f"after kill {i}", 5)[:2] and positions == list(range(5))
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def test_dex_up_restarts_a_stopped_gateway_and_a_streaming_client_resumes(standin_model, tmp_path):
    up = Up(standin_model, tmp_path, "--workers", "1", "--standin-delay", "0.05", "--http-port", "0")
    try:
        [gateway] = up.children(b"gateway")
        chunks = []
        t = threading.Thread(target=lambda: chunks.extend(
            stream_generate(up.address, "across a gateway restart", max_new_tokens=80, timeout=60, retries=12)))
        t.start()
        deadline = time.monotonic() + 30
        while sum(len(c.token_ids) for c in chunks) < 5:
            assert time.monotonic() < deadline and t.is_alive(), up.output()
            time.sleep(0.02)
        os.kill(gateway, signal.SIGTERM)                     # a rolling restart: it drains, dex up restarts it
        up.wait_for(f"supervise: gateway pid {gateway} exited (0); started pid", 30)
        t.join(60)
        ids, text, positions, _ = collect(chunks)
        assert positions == list(range(80))
        assert (ids, text) == _direct(standin_model, "across a gateway restart", 80)[:2]
        assert up.children(b"gateway") != [gateway]
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def test_dex_up_autoscaler_survives_its_redis_going_away(standin_model, tmp_path):
    up = Up(standin_model, tmp_path, "--min-workers", "1", "--max-workers", "2", "--scale-interval", "0.3")
    try:
        assert up.serve("hello", 3)[2] == [0, 1, 2]
        os.kill(up.redis_pid(), signal.SIGKILL)
        up.wait_for("autoscale: redis unavailable", 15)
        time.sleep(1.0)
        assert up.proc.poll() is None, f"dex up exited when Redis went away:\n{up.output()}"
        assert up.worker_pids(), "the workers exited when Redis went away"
    finally:
        up.stop()
    assert "Traceback" not in "".join(l for l in up.lines if "autoscale" in l or "dex up" in l)


class StepBomb(InstantEngine):
    """The stand-in, except that a round with a BOMB request raises (a stop check or a numerical error)."""

    def step(self):
        if any("BOMB" in a.req.prompt for a in self._active.values()):
            raise ZeroDivisionError("a stop check blew up")
        return super().step()


def test_an_engine_step_error_fails_its_round_and_the_worker_serves_on(make_gateway, redis_server, names,
                                                                      standin_model):
    import grpc
    import pytest

    from dexserve.queue.consumer import WorkerQueue
    from dexserve.worker.loop import Worker

    from .conftest import TEST_SETTINGS

    engine = StepBomb.load(str(standin_model))
    client = redis.Redis.from_url(redis_server.url)
    worker = Worker(engine, WorkerQueue(client, names, TEST_SETTINGS, "in-process-1"), grace_s=1)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    try:
        gw = make_gateway()
        with pytest.raises(grpc.RpcError) as err:
            list(stream_generate(gw.address, "BOMB", max_new_tokens=5, timeout=15))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine error: ZeroDivisionError" in err.value.details()
        deadline = time.monotonic() + 5                 # the client may hear of it a moment before the release
        while worker.held or engine.active:
            assert time.monotonic() < deadline, f"still held: {worker.held}, engine active {engine.active}"
            time.sleep(0.01)
        assert loop.is_alive()                           # released, not wedged, still serving
        ids, text, positions, _ = collect(stream_generate(gw.address, "fine", max_new_tokens=5, timeout=15))
        assert (ids, text) == _direct(standin_model, "fine", 5)[:2] and positions == list(range(5))
    finally:
        worker.request_stop()
        loop.join(10)
        client.close()


def test_a_redis_restart_that_loses_the_data_ends_streams_unavailable_and_retries_complete(
        make_gateway, workers, names, tmp_path, standin_model):
    """Redis without persistence restarts empty mid-stream: the request, its token stream and the consumer
    group are gone. A stream must not wait forever for tokens nobody will publish: a client without
    retries gets UNAVAILABLE naming the loss; `stream_generate` (retries) sends it again and gets the
    exact answer, resumed where it was, from the same worker process."""
    import grpc
    import pytest

    from dexserve.v1 import dex_pb2 as pb

    from .helpers import stub

    server = EmbeddedRedis(tmp_path / "volatile-redis", persistent=False).start()
    try:
        gw = make_gateway(redis_url=server.url, redis_socket_timeout_s=2.0)
        worker = workers.start("--standin-delay", "0.1", url=server.url)
        client = redis.Redis.from_url(server.url)
        workers.wait_ready(client, 1)
        client.close()
        result: dict[str, object] = {}

        def plain():
            ch, dex = stub(gw.address)
            with ch, pytest.raises(grpc.RpcError) as err:
                list(dex.Generate(pb.GenerateRequest(prompt="lost one", max_new_tokens=60, request_id="plain-1"),
                                  timeout=60))
            result["plain"] = err.value

        def retrying():
            try:
                result["retrying"] = collect(stream_generate(gw.address, "found again", max_new_tokens=40,
                                                             request_id="retrying-1", timeout=60))
            except Exception as exc:  # reported below
                result["retrying_error"] = exc

        threads = [threading.Thread(target=plain), threading.Thread(target=retrying)]
        for t in threads:
            t.start()
        time.sleep(1.0)                               # a few tokens of each out
        server.stop(kill=True)
        server.start()                                # empty: no AOF
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a stream still waits for a request Redis lost"
        err = result["plain"]
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "lost by the queue" in err.details() and "send it again" in err.details()
        assert "retrying_error" not in result, result.get("retrying_error")
        ids, text, positions, _ = result["retrying"]
        assert positions == list(range(40))
        assert (ids, text) == _direct(standin_model, "found again", 40)[:2]
        assert worker.poll() is None and len(workers.procs) == 1
    finally:
        workers.stop_all()
        server.stop()
