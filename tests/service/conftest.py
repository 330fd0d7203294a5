"""Fixtures for service tests: one real Redis per session, gateways in-process
on loopback gRPC, workers as real subprocesses. Each test gets a queue prefix
of its own so tests never see each other's keys."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from dexserve.contract.limits import Limits
from dexserve.gateway.config import GatewayConfig
from dexserve.queue.embedded import EmbeddedRedis
from dexserve.queue.protocol import QueueNames, QueueSettings

# Fast timings for tests: a dead worker's entries are claimed after 1 s; a client that leaves
# cancels at once (tests of resuming set a grace period of their own).
TEST_SETTINGS = QueueSettings(maxlen=1000, claim_idle_ms=1000, heartbeat_interval_s=0.2, heartbeat_ttl_s=2,
                              max_attempts=3, resume_grace_s=0.0)


def queue_flags(url: str, names: QueueNames, settings: QueueSettings) -> list[str]:
    return ["--redis-url", url, "--queue-prefix", names.prefix, "--queue-maxlen", str(settings.maxlen),
            "--claim-idle-ms", str(settings.claim_idle_ms), "--heartbeat-interval", str(settings.heartbeat_interval_s),
            "--max-attempts", str(settings.max_attempts)]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def standin_model(tmp_path_factory) -> Path:
    from dexserve.worker.standin import write_standin_model

    return write_standin_model(tmp_path_factory.mktemp("models") / "standin-model")


@pytest.fixture
def names() -> QueueNames:
    return QueueNames(f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def rclient(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


class Workers:
    """Worker subprocesses (`python -m dexserve.cli worker`), stopped at teardown."""

    def __init__(self, url: str, names: QueueNames, model: Path, settings: QueueSettings, log_dir: Path) -> None:
        self.url, self.names, self.model, self.settings, self.log_dir = url, names, model, settings, log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, *extra: str, engine: str = "standin", model: Path | None = None,
              settings: QueueSettings | None = None, url: str | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")
        cmd = [sys.executable, "-m", "dexserve.cli", "worker", "--engine", engine, "--model", str(model or self.model),
               *queue_flags(url or self.url, self.names, settings or self.settings), "--grace", "5", *extra]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.procs.append(proc)
        return proc

    def consumers_alive(self, client: redis.Redis) -> int:
        return len(list(client.scan_iter(self.names.workers_pattern())))

    def wait_ready(self, client: redis.Redis, n: int, timeout: float = 60.0) -> None:
        """Until `n` workers heartbeat (their loops run)."""
        deadline = time.monotonic() + timeout
        while self.consumers_alive(client) < n:
            for p in self.procs:
                if p.poll() is not None and p.returncode != 0:
                    raise RuntimeError(f"worker exited {p.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready: {self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("worker-*.log")))

    def stop_all(self) -> None:
        stop_processes(self.procs, 10)


def stop_processes(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process (they drain), then kill whatever is still up after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def standin_service(redis_url: str, model: Path, log_dir: Path, prefix: str, **gateway):
    """One in-process gateway (`gateway`: GatewayConfig overrides) and two stand-in workers
    (8 slots each, 10 ms rounds) on a queue prefix of their own: yields (gateway, names, client)."""
    from dexserve.gateway.server import BackgroundGateway

    names = QueueNames(f"{prefix}{uuid.uuid4().hex[:8]}")
    gw = BackgroundGateway(GatewayConfig(redis_url=redis_url, port=0, model=str(model), names=names,
                                         settings=TEST_SETTINGS, **gateway))
    w = Workers(redis_url, names, model, TEST_SETTINGS, log_dir)
    client = redis.Redis.from_url(redis_url)
    try:
        for _ in range(2):
            w.start("--max-batch", "8", "--standin-delay", "0.01")
        w.wait_ready(client, 2)
        yield gw, names, client
    finally:
        w.stop_all()
        gw.stop()
        client.close()


@pytest.fixture
def workers(redis_server, names, standin_model, tmp_path):
    w = Workers(redis_server.url, names, standin_model, TEST_SETTINGS, tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def make_gateway(redis_server, names, standin_model):
    """Start in-process gateways (BackgroundGateway) with overrides; stopped at teardown."""
    from dexserve.gateway.server import BackgroundGateway

    started = []

    def make(**overrides) -> BackgroundGateway:
        cfg = dict(redis_url=redis_server.url, host="127.0.0.1", port=0, model=str(standin_model),
                   names=names, settings=TEST_SETTINGS)
        if "max_context" in overrides:
            overrides["limits"] = Limits(max_context=overrides.pop("max_context"))
        cfg.update(overrides)
        gw = BackgroundGateway(GatewayConfig(**cfg))
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
