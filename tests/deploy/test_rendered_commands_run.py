"""The rendered manifests run: the gateway and worker containers of the GPU profile, started
as local processes from their own `args` and `env` (the image's ENTRYPOINT is `dex`), serve a
request end to end. Catches a chart whose args or environment no longer match the CLI.

What the test changes, and nothing else: DEX_DEVICE=cpu (no GPU here; the distributed executor
then runs its explorers over gloo instead of NCCL), REDIS_URL to a private Redis, DEX_MODEL_DIR
to the shipped model (the PVC is not here), the listen/metrics ports to free loopback ports, and
the values of Secrets and downward-API fields, resolved as the kubelet would. The OTLP endpoint
is rendered empty (no collector here).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from dexserve.contract.model_card import shipped_model_dir
from dexserve.queue.embedded import EmbeddedRedis, free_port
from dexserve.queue.protocol import QueueNames

from ._chart import CHART, GPU_KEDA_VALUES, NAMESPACE, ROOT, find, render

AUTH_TOKEN = "test-token"
SECRETS = {("dex-auth", "token"): AUTH_TOKEN, ("dex-dexserve-redis", "password"): ""}


def resolve_env(container: dict, pod_name: str, overrides: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secretKeyRef / fieldRef values,
    then $(VAR) expansion against the variables defined before (k8s dependent variables)."""
    env: dict[str, str] = {}
    fields = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE}
    for e in container.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            value = SECRETS[(ref["name"], ref["key"])]
        elif "fieldRef" in e.get("valueFrom", {}):
            value = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unhandled env source {e}")
        env[e["name"]] = value
    env.update(overrides)
    return env


def _entrypoint(dockerfile: str) -> list[str]:
    text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
    (entry,) = re.findall(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M)
    return [entry]


def _start(container: dict, env: dict[str, str], log: Path) -> subprocess.Popen:
    assert "command" not in container, "the image's ENTRYPOINT runs the container"
    # `dex ARGS` from this checkout: the venv's console script is `python -m dexserve.cli`.
    argv = [sys.executable, "-m", "dexserve.cli", *container["args"]]
    base = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG") if k in os.environ}
    return subprocess.Popen(argv, env={**base, **env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=log.parent)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(cond, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise AssertionError(f"{what}: process exited {p.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: timed out\n" + "\n".join(l.read_text(errors="replace")[-3000:] for l in logs))
        time.sleep(0.1)


@pytest.fixture
def private_redis(tmp_path):
    srv = EmbeddedRedis(tmp_path / "redis").start()
    yield srv
    srv.stop()


PROFILES = {
    # K=4 explorers on 4 GPUs: distributed executor over NCCL (gloo once the device is cpu).
    "gpu-keda": (GPU_KEDA_VALUES, ("distributed", "torch", "4")),
    # CPU-only cluster: distributed executor over shared memory.
    "cpu": (CHART / "ci" / "cpu-values.yaml", ("distributed", "shm", "2")),
}


@pytest.mark.parametrize("values, engine", PROFILES.values(), ids=PROFILES.keys())
def test_rendered_gateway_and_worker_serve_a_request(private_redis, tmp_path, values, engine) -> None:
    from dexserve.client import stream_generate

    docs = render(values, sets=("otel.endpoint=",))
    gw_c = find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    wk_c = find(docs, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    assert _entrypoint("gateway.Dockerfile") == _entrypoint("worker.Dockerfile") == ["dex"]
    model = str(shipped_model_dir())
    common = {"REDIS_URL": private_redis.url, "DEX_MODEL_DIR": model}
    wk_env = resolve_env(wk_c, "dex-dexserve-worker-0", {**common, "DEX_DEVICE": "cpu",
                                                         "DEX_METRICS_PORT": str(free_port())})
    # The profile's executor layout runs as rendered; only the device changes here.
    assert (wk_env["DEX_EXECUTOR"], wk_env["DEX_TRANSPORT"], wk_env["DEX_EXPLORERS"]) == engine
    port, http_port = free_port(), free_port()
    gw_env = resolve_env(gw_c, "dex-dexserve-gateway-0", {**common, "DEX_HOST": "127.0.0.1", "DEX_PORT": str(port),
                                                          "DEX_HTTP_PORT": str(http_port),
                                                          "DEX_METRICS_PORT": str(free_port())})
    assert gw_env["DEX_MAX_CONTEXT"] == wk_env["DEX_MAX_CONTEXT"]
    token = gw_env.get("DEX_AUTH_TOKEN")
    assert (token == AUTH_TOKEN) == (values == GPU_KEDA_VALUES), "the gpu-keda profile turns auth on"
    names = QueueNames(wk_env["DEX_QUEUE_PREFIX"])
    client = redis.Redis.from_url(private_redis.url)

    wk_log, gw_log = tmp_path / "worker.log", tmp_path / "gateway.log"
    worker = _start(wk_c, wk_env, wk_log)
    gateway = None
    try:
        _wait(lambda: client.exists(names.model_card()) and list(client.scan_iter(names.workers_pattern())),
              "worker ready (model card published, heartbeat)", [worker], [wk_log], 300)
        gateway = _start(gw_c, gw_env, gw_log)
        _wait(lambda: b"listening" in gw_log.read_bytes(), "gateway listening", [gateway, worker], [gw_log, wk_log], 60)
        chunks = list(stream_generate(f"127.0.0.1:{port}", "def add(a, b):", token=token, timeout=60,
                                      max_new_tokens=8))
        text = "".join(c.text for c in chunks)
        assert chunks and chunks[-1].finish_reason, chunks
        assert sum(len(c.token_ids) for c in chunks) == 8 and text
        # The HTTP door of the same container: the same token, the same tokens.
        http = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/completions",
            json.dumps({"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}).encode(),
            {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})})
        with urllib.request.urlopen(http, timeout=60) as resp:
            assert json.loads(resp.read())["choices"][0]["text"] == text
        if values != GPU_KEDA_VALUES:
            return
        # The same gateway command with another model's limits refuses to start (exit 3) once its
        # wait for the workers' card to change runs out (shortened here).
        bad = resolve_env(gw_c, "dex-dexserve-gateway-1", {**common, "DEX_HOST": "127.0.0.1", "DEX_PORT": "0",
                                                           "DEX_HTTP_PORT": "0",
                                                           "DEX_METRICS_PORT": str(free_port()),
                                                           "DEX_MAX_CONTEXT": "256",
                                                           "DEX_MODEL_CARD_WAIT_S": "1"})
        refused = subprocess.run([sys.executable, "-m", "dexserve.cli", *gw_c["args"]], env={**os.environ, **bad},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "max_context" in refused.stdout + refused.stderr
    finally:
        _stop(*[p for p in (gateway, worker) if p is not None])
        client.close()
