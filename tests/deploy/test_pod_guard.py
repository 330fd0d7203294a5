"""PodGuard against the Kubernetes API contract: the exact PATCH requests on the wire.

A real HTTP server on 127.0.0.1 stands in for the API server; the real kubernetes client
talks to it, so what is asserted is what a cluster would receive.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from dexserve.kube.pod_guard import DELETION_COST, DO_NOT_DISRUPT, PodGuard

NS, NAME = "serving", "dex-worker-7d9f-abcde"


class _Recorder(BaseHTTPRequestHandler):
    records: list[dict[str, Any]] = []
    status = 200

    def do_PATCH(self) -> None:  # noqa: N802 - http.server naming
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        type(self).records.append(
            {"method": "PATCH", "path": self.path, "content_type": self.headers.get("Content-Type"),
             "body": json.loads(raw) if raw else None}
        )
        payload = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME, "namespace": NS}})
        if type(self).status != 200:
            payload = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": type(self).status})
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def api_server() -> Iterator[type[_Recorder]]:
    handler = type("Recorder", (_Recorder,), {"records": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def _guard(url: str) -> PodGuard:
    from kubernetes import client

    cfg = client.Configuration(host=url)
    return PodGuard(client.CoreV1Api(client.ApiClient(cfg)), NAME, NS)


def test_busy_then_idle_sends_exact_merge_patches(api_server) -> None:
    guard = _guard(api_server.url)
    guard.mark_busy()
    guard.mark_idle()
    assert api_server.records == [
        {
            "method": "PATCH",
            "path": f"/api/v1/namespaces/{NS}/pods/{NAME}",
            "content_type": "application/merge-patch+json",
            "body": {"metadata": {"annotations": {DELETION_COST: "1000000", DO_NOT_DISRUPT: "true"}}},
        },
        {
            "method": "PATCH",
            "path": f"/api/v1/namespaces/{NS}/pods/{NAME}",
            "content_type": "application/merge-patch+json",
            # null removes the key under JSON merge patch (RFC 7386).
            "body": {"metadata": {"annotations": {DELETION_COST: None, DO_NOT_DISRUPT: None}}},
        },
    ]


def test_only_state_changes_are_sent(api_server) -> None:
    guard = _guard(api_server.url)
    for _ in range(5):
        guard.mark_busy()
    assert len(api_server.records) == 1
    guard.mark_idle()
    guard.mark_idle()
    guard.mark_busy()
    assert [r["body"]["metadata"]["annotations"][DO_NOT_DISRUPT] for r in api_server.records] == ["true", None, "true"]


def test_first_idle_clears_stale_annotations(api_server) -> None:
    """State starts unknown: a restarted container clears what a crashed one left."""
    guard = _guard(api_server.url)
    guard.mark_idle()
    assert len(api_server.records) == 1 and api_server.records[0]["body"]["metadata"]["annotations"][DELETION_COST] is None


def test_api_errors_are_logged_not_raised_and_retried(api_server, caplog) -> None:
    api_server.status = 403
    guard = _guard(api_server.url)
    guard.mark_busy()  # must not raise
    assert guard.busy is None and "failed" in caplog.text
    api_server.status = 200
    guard.mark_busy()  # retried, since the first one was not acknowledged
    assert len(api_server.records) == 2 and guard.busy is True


def test_unreachable_api_does_not_raise() -> None:
    from kubernetes import client

    cfg = client.Configuration(host="http://127.0.0.1:9")  # discard port: connection refused
    guard = PodGuard(client.CoreV1Api(client.ApiClient(cfg)), NAME, NS, request_timeout=(0.5, 0.5))
    guard.mark_busy()
    assert guard.busy is None


def test_async_variants(api_server) -> None:
    import asyncio

    guard = _guard(api_server.url)

    async def run() -> None:
        await guard.amark_busy()
        await guard.amark_busy()
        await guard.amark_idle()

    asyncio.run(run())
    assert len(api_server.records) == 2


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DEX_POD_NAME": NAME, "DEX_POD_NAMESPACE": NS},
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "DEX_POD_NAME": NAME},
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "DEX_POD_NAMESPACE": NS},
    ],
    ids=["nothing", "no-service-host", "no-namespace", "no-name"],
)
def test_from_env_outside_cluster_is_noop(env: dict[str, str]) -> None:
    guard = PodGuard.from_env(env)
    assert not guard.enabled
    guard.mark_busy()
    guard.mark_idle()  # no API, no error


def test_from_env_in_cluster_without_serviceaccount_degrades(tmp_path) -> None:
    """KUBERNETES_SERVICE_HOST set but no token mounted: disabled, not crashed."""
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "DEX_POD_NAME": NAME, "DEX_POD_NAMESPACE": NS}
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        guard = PodGuard.from_env(env)
    # In CI there is no /var/run/secrets/kubernetes.io/serviceaccount; on a real node there is.
    if not os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        assert not guard.enabled
