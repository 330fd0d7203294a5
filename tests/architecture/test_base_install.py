"""The base install (no `engine` extra) serves the gateway and the queue with no torch.

Built the way the gateway image is: from proto/, service/ and the packaging
files alone, into a fresh virtualenv, from PyPI. Then the gateway it installed
is started against a real Redis and used from outside over gRPC.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dexserve.queue.embedded import EmbeddedRedis, free_port
from dexserve.queue.protocol import QueueNames
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> Path:
    """A fresh venv holding only `pip install .` of a gateway-image build context."""
    root = tmp_path_factory.mktemp("base")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("proto", "service"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return env_dir


def test_base_install_has_no_torch_and_no_engine(base_env):
    probe = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
             "['torch', 'transformers', 'dexserve', 'dexserve.gateway', 'dexserve.contract', 'dexserve.v1', "
             "'dexserve.engine', 'dexserve.worker', 'dexserve.launch']}))")
    found = json.loads(subprocess.run([str(base_env / "bin" / "python"), "-c", probe], capture_output=True,
                                      text=True, check=True, cwd="/").stdout)
    assert found == {"torch": False, "transformers": False, "dexserve": True, "dexserve.gateway": True,
                     "dexserve.contract": True, "dexserve.v1": True, "dexserve.engine": False,
                     "dexserve.worker": False, "dexserve.launch": False}
    # every command is listed; an engine command says what to install instead of a traceback
    dex = str(base_env / "bin" / "dex")
    helptext = subprocess.run([dex, "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("gateway", "worker", "generate", "bench", "up"):
        assert name in helptext
    res = subprocess.run([dex, "worker"], capture_output=True, text=True)
    assert res.returncode == 2 and "pip install 'dexserve[engine]'" in res.stderr


def test_base_install_gateway_serves_and_queues(base_env, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    port, http_port = free_port(), free_port()
    names = QueueNames("base")
    proc = subprocess.Popen([str(base_env / "bin" / "dex"), "gateway", "--port", str(port), "--http-port",
                             str(http_port), "--redis-url", server.url, "--queue-prefix", names.prefix],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert "dexserve.v1.DexService" in {s.name for s in reply.list_services_response.service}
            stub = dex_pb2_grpc.DexServiceStub(ch)
            with pytest.raises(grpc.RpcError) as bad:
                stub.Complete(pb.GenerateRequest(prompt="def f():", max_new_tokens=0), timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in bad.value.details()
            # a valid request is queued (no worker runs here: the stream is cut by its deadline)
            call = stub.Generate(pb.GenerateRequest(prompt="def f():", max_new_tokens=4, request_id="base-1"),
                                 timeout=3)
            with pytest.raises(grpc.RpcError):
                list(call)
        # the OpenAI-compatible HTTP door of the same torch-free install: health, models, a 400 naming the field
        base = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "dexcode-6m"
        with pytest.raises(urllib.error.HTTPError) as http_bad:
            urllib.request.urlopen(urllib.request.Request(f"{base}/v1/completions", json.dumps(
                {"prompt": "def f():", "max_tokens": 0}).encode(), {"content-type": "application/json"}), timeout=10)
        assert http_bad.value.code == 400 and json.loads(http_bad.value.read())["error"]["param"] == "max_tokens"
        client = redis.Redis.from_url(server.url)
        deadline = time.time() + 5
        while client.xlen(names.requests) < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert client.xlen(names.requests) == 1
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            server.stop()
