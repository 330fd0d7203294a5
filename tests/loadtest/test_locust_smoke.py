"""The headless locust smoke profile passes against `dex up`: exit code 0 and
TTFT / ITL / FULL each measured with >0 requests and 0 failures.

Runs the real engine with the shipped model when its weights exist (that is
the product), else the stand-in engine so the load-test plumbing (gevent
gRPC, manual request events, config, CSV) is still exercised. dex up and
locust are subprocesses, always stopped in `finally`.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dexserve.client import stream_generate
from dexserve.contract.model_card import shipped_model_dir
from dexserve.queue.embedded import free_port

# Only look for locust: importing it here would gevent-monkey-patch the pytest process.
# `make test` installs it (dev extra); its absence is a broken setup, not a skip.
assert importlib.util.find_spec("locust") is not None, "locust is not installed (pip install -e '.[dev]')"

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SMOKE = ROOT / "loadtest" / "smoke.conf"
KINDS = ("TTFT", "ITL", "FULL")
# Small real-engine settings: the smoke checks correctness under concurrency, not capacity.
# --no-compile: a cold compile takes a minute or two on 2 cores; the compiled step has its own equality tests
REAL_ENGINE = ["--engine", "dex", "--explorers", "2", "--width", "4", "--max-batch", "4", "--max-context", "512",
               "--no-compile"]


def _engine_argv(tmp_path: Path) -> tuple[list[str], str]:
    if (shipped_model_dir() / "model.safetensors").is_file():
        return REAL_ENGINE, "dex (shipped model)"
    from dexserve.worker.standin import write_standin_model

    model = write_standin_model(tmp_path / "standin-model")
    return ["--engine", "standin", "--model", str(model), "--standin-delay", "0.02"], "standin (no shipped weights)"


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def dex_up(tmp_path: Path) -> Iterator[str]:
    """`dex up` with one worker, serving once a stream completes; yields host:port."""
    engine, label = _engine_argv(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "dex-up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dexserve.cli", "up", "--port", str(port), "--workers", "1",
                             "--data-dir", str(tmp_path / "redis"), *engine], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:     # gateway up and the worker's engine loaded: one short stream succeeds
            assert proc.poll() is None, (tmp_path / "dex-up.log").read_text()[-4000:]
            try:
                list(stream_generate(address, "def f(x):", max_new_tokens=2, timeout=30))
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        print(f"dex up: engine {label}")
        yield address
    finally:
        _stop(proc, 60)
        log.close()


def test_smoke_profile_passes_against_dex_up(dex_up: str, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--config", str(SMOKE), "--host", f"grpc://{dex_up}",
           "--csv", str(prefix)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=60)          # run-time 20 s + stop-timeout 10 s, with slack
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
    log = "".join(out)[-6000:]
    assert rc == 0, log
    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    for kind in KINDS:
        row = rows.get((kind, "Generate"))
        assert row is not None, f"no {kind} rows in {sorted(rows)}\n{log}"
        assert int(row["Request Count"]) > 0, (kind, row)
        assert int(row["Failure Count"]) == 0, (kind, row)
    # Nothing failed anywhere (failures CSV has only its header).
    with open(f"{prefix}_failures.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [], log
