"""Telemetry test fixtures: the service tests' Redis and queue fixtures, a
local OTLP/gRPC receiver, a tiny random Llama, and a whole stack (gateway and
worker PROCESSES exporting spans to the receiver and serving metrics)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dexserve.queue.protocol import QueueNames
from dexserve.telemetry.receiver import OtlpReceiver
from service.conftest import (TEST_SETTINGS, names, queue_flags, rclient, redis_server, stop_processes,  # noqa: F401 (fixtures)
                             standin_model)

ENGINE_FLAGS = ["--explorers", "2", "--width", "2", "--max-batch", "2", "--max-context", "256",
                "--max-new-tokens-limit", "64", "--no-compile"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with the shipped tokenizer and no EOS (every request runs to max_new_tokens)."""
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", eos=False)


@dataclass
class Stack:
    """`dex gateway` and `dex worker` processes with tracing and metrics on."""

    receiver: OtlpReceiver
    names: QueueNames
    address: str = ""
    http_url: str = ""                   # the OpenAI-compatible door
    gateway_metrics: str = ""
    worker_metrics: str = ""
    healthz_seen: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs)

    def stop(self) -> None:
        stop_processes(self.procs, 15)


def _spawn(stack: Stack, log: Path, cmd: list[str], env: dict) -> subprocess.Popen:
    stack.logs.append(log)
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    stack.procs.append(proc)
    return proc


@pytest.fixture(scope="module")
def stack(redis_server, tiny_llama, tmp_path_factory):  # noqa: F811 (fixture from the service tests)
    """One gateway and one real-engine worker, both exporting to a local OTLP receiver."""
    rec = OtlpReceiver().start()
    qnames = QueueNames(f"t{uuid.uuid4().hex[:8]}")
    logs = tmp_path_factory.mktemp("stack")
    st = Stack(rec, qnames)
    gport, wport = free_port(), free_port()
    st.gateway_metrics, st.worker_metrics = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{wport}"
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": rec.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100", "DEX_METRICS_HOST": "127.0.0.1"}
    for key in ("OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        base.pop(key, None)
    qflags = queue_flags(redis_server.url, qnames, TEST_SETTINGS)
    try:
        worker = _spawn(st, logs / "worker.log",
                        [sys.executable, "-m", "dexserve.cli", "worker", "--engine", "dex", "--model", str(tiny_llama),
                         *ENGINE_FLAGS, *qflags, "--grace", "5"], {**base, "DEX_METRICS_PORT": str(wport)})
        deadline = time.monotonic() + 180
        while True:                      # /healthz: refused while starting, 503 while loading, then 200
            try:
                code, _ = http_get(st.worker_metrics + "/healthz", timeout=2)
                st.healthz_seen.append(code)
                if code == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker never became ready:\n{st.log_tail()}")
            time.sleep(0.02)
        gw_log = logs / "gateway.log"
        http_port = free_port()
        st.http_url = f"http://127.0.0.1:{http_port}"
        _spawn(st, gw_log, [sys.executable, "-m", "dexserve.cli", "gateway", "--host", "127.0.0.1", "--port", "0",
                            "--http-port", str(http_port), "--model", str(tiny_llama), "--max-context", "256", "--max-new-tokens-limit", "64",
                            *qflags], {**base, "DEX_METRICS_PORT": str(gport)})
        while not st.address:
            m = re.search(r"listening on (\S+:\d+)", gw_log.read_text(errors="replace"))
            if m:
                st.address = m.group(1)
            elif st.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{st.log_tail()}")
            time.sleep(0.05)
        yield st
    finally:
        st.stop()
        rec.stop()
