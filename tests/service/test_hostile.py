"""Hostile clients against real gateways (real Redis, real gRPC over loopback): auth on the
gateway `dex gateway` builds (telemetry interceptor included), bounded error messages, a stream
limit that refuses before the Redis pool runs out, quiet idle streams, a re-attach to a cancelled
request, and a restarted attempt that diverges from what was already sent (never spliced).
The same behaviours on the OpenAI-compatible HTTP door (one GatewayCore serves both): a bounded
404, the stream limit counted over both doors (429), a divergence as an error event before
[DONE], drain (503, open SSE streams end), and a disconnect that cancels at once (no resume)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from dexserve.client import build_request
from dexserve.gateway.config import POOL_HEADROOM, GatewayConfig
from dexserve.gateway.server import BackgroundGateway
from dexserve.queue.embedded import free_port
from dexserve.queue.protocol import EVENT_FIELD
from dexserve.telemetry.gateway_observer import GatewayTelemetry
from dexserve.telemetry.metrics import GatewayMetrics
from dexserve.telemetry.tracing import DIVERGENCE_EVENT
from dexserve.v1 import dex_pb2 as pb

from .conftest import TEST_SETTINGS, queue_flags
from .helpers import collect, stub, token_events


@pytest.fixture
def dex_gateway(redis_server, names, standin_model, tmp_path):
    """`python -m dexserve.cli gateway` as deployed: its own telemetry (metrics port, tracing
    interceptor) and a bearer token."""
    port = free_port()
    log = open(tmp_path / "gateway.log", "wb")
    env = {**os.environ, "DEX_METRICS_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dexserve.cli", "gateway", "--port", str(port), "--model",
                             str(standin_model), "--auth-token", "s3cret", "--no-model-card-check",
                             *queue_flags(redis_server.url, names, TEST_SETTINGS)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while b"listening on" not in (tmp_path / "gateway.log").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
        time.sleep(0.1)
    yield address
    proc.terminate()
    proc.wait(15)


def test_generate_without_a_valid_token_is_unauthenticated_on_dex_gateway(dex_gateway):
    ch, s = stub(dex_gateway)
    with ch:
        for md, needle in (((), "missing"), ((("authorization", "Bearer nope"),), "invalid")):
            with pytest.raises(grpc.RpcError) as err:
                list(s.Generate(build_request("x", max_new_tokens=2), metadata=md, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
            assert needle in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                s.Complete(build_request("x", max_new_tokens=2), metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert s.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer s3cret"),), timeout=10).models


def test_not_found_does_not_echo_a_huge_model_name(make_gateway):
    gw = make_gateway()
    ch, s = stub(gw.address)
    with ch:
        with pytest.raises(grpc.RpcError) as err:
            list(s.Generate(pb.GenerateRequest(prompt="x", model="m" * 1_000_000), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    details = err.value.details()
    assert details.startswith("model: ") and "1000000 characters" in details
    assert len(details) < 300


def test_the_stream_limit_refuses_not_the_redis_pool(make_gateway, rclient, names):
    """More open streams than redis-py's default pool (100): each holds a connection in XREAD
    BLOCK; the pool is sized from max_streams, so every one of them stays open and the one
    past the limit gets RESOURCE_EXHAUSTED naming it (not UNAVAILABLE 'Too many connections')."""
    limit = 110
    gw = make_gateway(max_streams=limit)
    assert gw.gateway.redis.connection_pool.max_connections == limit + POOL_HEADROOM
    ch, s = stub(gw.address)
    with ch:
        calls = [s.Generate(build_request(f"open {i}", max_new_tokens=2), timeout=60) for i in range(limit)]
        deadline = time.monotonic() + 30
        while rclient.xlen(names.requests) < limit:    # no worker: every call waits in its blocking read
            failed = [c for c in calls if c.done()]
            assert not failed, f"{len(failed)} calls ended: {failed[0].code()} {failed[0].details()}"
            assert time.monotonic() < deadline, f"only {rclient.xlen(names.requests)} enqueued"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            list(s.Generate(build_request("one too many", max_new_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream limit" in err.value.details() and str(limit) in err.value.details()
        assert rclient.xlen(names.requests) == limit      # refused before it reached the queue
        assert not [c for c in calls if c.done()]
        calls[0].cancel()
        deadline = time.monotonic() + 10
        while gw.gateway.core.open_streams >= limit:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        late = s.Generate(build_request("after one left", max_new_tokens=2), timeout=60)
        while rclient.xlen(names.requests) < limit + 1:   # a freed slot is taken again
            assert not late.done(), late.details()
            time.sleep(0.05)
        for c in calls + [late]:
            c.cancel()


def test_an_idle_stream_does_not_time_out_its_connection(make_gateway, caplog):
    """The blocking read waits half the socket timeout: an idle stream logs nothing."""
    gw = make_gateway(redis_socket_timeout_s=1.0)
    ch, s = stub(gw.address)
    with ch, caplog.at_level(logging.WARNING, logger="dexserve.queue.producer"):
        call = s.Generate(build_request("nobody serves this", max_new_tokens=2), timeout=60)
        time.sleep(3.5)                                   # several socket timeouts
        assert not call.done()
        call.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.name == "dexserve.queue.producer"]
    assert not warnings, warnings


def test_reattaching_to_a_cancelled_request_is_not_ok(make_gateway, workers, rclient, names):
    gw = make_gateway()
    workers.start("--standin-delay", "0.05")
    workers.wait_ready(rclient, 1)
    rid = "cancelled-" + uuid.uuid4().hex[:6]
    req = build_request("def slow():", max_new_tokens=300, request_id=rid)
    ch, s = stub(gw.address)
    with ch:
        call = s.Generate(req, timeout=60)
        for i, _ in enumerate(call):
            if i == 2:
                break
        call.cancel()
        deadline = time.monotonic() + 10
        while not any(e.HasField("finish") for e in token_events(rclient, names, rid)):
            assert time.monotonic() < deadline, "the worker never finished the cancelled request"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            list(s.Generate(req, timeout=30))             # same id, same body: attaches to the stopped request
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in err.value.details() and "new request_id" in err.value.details()


@pytest.fixture
def observed_gateway(redis_server, names, standin_model):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    observer = GatewayTelemetry(provider.get_tracer("test"), GatewayMetrics(registry), names)
    gw = BackgroundGateway(GatewayConfig(redis_url=redis_server.url, port=0, http_port=0, model=str(standin_model),
                                         names=names, settings=TEST_SETTINGS), observer)
    yield gw, exporter, registry
    gw.stop()


def _publish(rclient, names, rid, attempt, tokens, finish=False):
    """Play a worker: one event of `attempt` with (index, token id) pairs; the finish counts every
    token of the attempt (the last index + 1)."""
    ev = pb.StreamEvent(attempt=attempt, commit_unix_nanos=time.time_ns(),
                        tokens=[pb.TokenMessage(index=i, token_id=t, text=f"<{t}>") for i, t in tokens])
    if finish:
        ev.finish.CopyFrom(pb.FinishMessage(reason=pb.FINISH_REASON_LENGTH,
                                            usage=pb.Usage(prompt_tokens=1,
                                                           completion_tokens=tokens[-1][0] + 1 if tokens else 0)))
    rclient.xadd(names.tokens(rid), {EVENT_FIELD: ev.SerializeToString()})


def _wait_enqueued(rclient, names, n=1):
    deadline = time.monotonic() + 10
    while rclient.xlen(names.requests) < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_restart_that_agrees_continues_exactly(observed_gateway, rclient, names):
    gw, _exporter, registry = observed_gateway
    rid = "agree-" + uuid.uuid4().hex[:6]
    ch, s = stub(gw.address)
    with ch:
        call = s.Generate(build_request("x", max_new_tokens=5, request_id=rid), timeout=30)
        _wait_enqueued(rclient, names)
        _publish(rclient, names, rid, 1, [(0, 10), (1, 11), (2, 12)])
        _publish(rclient, names, rid, 2, [(0, 10), (1, 11)])             # the restarted attempt repeats
        _publish(rclient, names, rid, 2, [(2, 12), (3, 13), (4, 14)], finish=True)
        ids, text, positions, reason = collect(call)
    assert ids == [10, 11, 12, 13, 14] and positions == list(range(5)) and reason == pb.FINISH_REASON_LENGTH
    assert text == "<10><11><12><13><14>"
    assert not registry.get_sample_value("dex_gateway_divergences_total")


def test_a_restart_that_diverges_ends_the_stream_aborted_never_spliced(observed_gateway, rclient, names):
    gw, exporter, registry = observed_gateway
    rid = "diverge-" + uuid.uuid4().hex[:6]
    ch, s = stub(gw.address)
    got = []
    with ch:
        call = s.Generate(build_request("x", max_new_tokens=5, request_id=rid), timeout=30)
        _wait_enqueued(rclient, names)
        _publish(rclient, names, rid, 1, [(0, 10), (1, 11), (2, 12)])
        _publish(rclient, names, rid, 2, [(0, 10), (1, 99)])             # another token at position 1
        _publish(rclient, names, rid, 2, [(2, 98), (3, 97), (4, 96)], finish=True)
        with pytest.raises(grpc.RpcError) as err:
            for chunk in call:
                got.extend(chunk.token_ids)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "position 1" in err.value.details() and "attempt 2" in err.value.details()
    assert got == [10, 11, 12], "tokens of the diverging attempt reached the client"
    assert registry.get_sample_value("dex_gateway_divergences_total") == 1
    deadline = time.monotonic() + 10
    while not (spans := [sp for sp in exporter.get_finished_spans() if sp.name.endswith("/Generate")]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    events = {e.name: e.attributes for e in spans[0].events}
    assert events[DIVERGENCE_EVENT]["dex.position"] == 1 and events[DIVERGENCE_EVENT]["dex.attempt"] == 2


def test_the_end_of_an_attempt_whose_start_is_missing_does_not_end_the_stream_with_a_gap(observed_gateway,
                                                                                          rclient, names):
    """Redis lost its data while an attempt ran; the attempt published on into a fresh token stream
    (positions 3.. and its finish). Ending the stream there would skip positions 0-2: the gateway waits
    for the attempt that restarts the request from 0."""
    gw, _exporter, registry = observed_gateway
    rid = "gap-" + uuid.uuid4().hex[:6]
    ch, s = stub(gw.address)
    with ch:
        call = s.Generate(build_request("x", max_new_tokens=5, request_id=rid), timeout=30)
        _wait_enqueued(rclient, names)
        _publish(rclient, names, rid, 1, [(3, 13), (4, 14)], finish=True)     # the old attempt's tail
        _publish(rclient, names, rid, 1, [(0, 10), (1, 11), (2, 12)])         # the request, sent again
        _publish(rclient, names, rid, 1, [(3, 13), (4, 14)], finish=True)
        ids, text, positions, reason = collect(call)
    assert ids == [10, 11, 12, 13, 14] and positions == list(range(5)) and reason == pb.FINISH_REASON_LENGTH
    assert not registry.get_sample_value("dex_gateway_divergences_total")


# ---- the same on the HTTP door ------------------------------------------------------------------------

GRACE = dataclasses.replace(TEST_SETTINGS, resume_grace_s=30.0)


def _http(gw) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)


def _send(conn: http.client.HTTPConnection, body: dict) -> None:
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})


def _answer(conn: http.client.HTTPConnection) -> tuple[int, dict]:
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _sse_events(resp) -> list:
    """Every `data:` event of an SSE response, JSON-decoded ([DONE] stays a string)."""
    out = []
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _queued_ids(rclient, names, prompt: str | None = None) -> list[str]:
    """The ids of the queued requests (with `prompt`, when given)."""
    queued = [pb.QueuedRequest.FromString(f[b"m"]) for _id, f in rclient.xrange(names.requests)]
    return [q.request_id for q in queued if prompt is None or q.request.prompt == prompt]


def test_http_not_found_does_not_echo_a_huge_model_name(make_gateway):
    gw = make_gateway(http_port=0)
    conn = _http(gw)
    _send(conn, {"model": "m" * 1_000_000, "prompt": "x", "max_tokens": 2})
    status, body = _answer(conn)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "1000000 characters" in body["error"]["message"] and len(json.dumps(body)) < 400


def test_the_stream_limit_counts_both_doors_and_an_http_disconnect_cancels_at_once(make_gateway, rclient, names):
    gw = make_gateway(max_streams=2, http_port=0, settings=GRACE)   # a gRPC client would get 30 s to resume
    ch, s = stub(gw.address)
    with ch:
        call = s.Generate(build_request("grpc", max_new_tokens=2), timeout=60)
        waiting = _http(gw)
        _send(waiting, {"prompt": "http", "max_tokens": 2})        # no worker: it waits in the queue
        _wait_enqueued(rclient, names, 2)
        over = _http(gw)
        _send(over, {"prompt": "one too many", "max_tokens": 2})
        status, body = _answer(over)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        assert "stream limit" in body["error"]["message"] and "2 open calls" in body["error"]["message"]
        with pytest.raises(grpc.RpcError) as err:
            list(s.Generate(build_request("one too many", max_new_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rclient.xlen(names.requests) == 2                    # both refused before the queue
        assert not call.done()
        (http_rid,) = _queued_ids(rclient, names, prompt="http")
        waiting.close()                                             # the HTTP client goes away
        deadline = time.monotonic() + 10
        while gw.gateway.core.open_streams > 1 or not rclient.exists(names.cancel(http_rid)):
            assert time.monotonic() < deadline, "the HTTP disconnect did not release its slot and request"
            time.sleep(0.05)
        assert not rclient.exists(names.grace(http_rid)), "an HTTP request nobody can resume got a resume grace"
        call.cancel()


def test_a_restart_that_diverges_ends_an_http_stream_with_an_error_event(observed_gateway, rclient, names):
    gw, exporter, registry = observed_gateway
    conn = _http(gw)
    _send(conn, {"prompt": "x", "max_tokens": 5, "stream": True})
    _wait_enqueued(rclient, names)
    (rid,) = _queued_ids(rclient, names)
    _publish(rclient, names, rid, 1, [(0, 10), (1, 11), (2, 12)])
    resp = conn.getresponse()                                       # answers with the first chunk
    assert resp.status == 200
    _publish(rclient, names, rid, 2, [(0, 10), (1, 99)])             # another token at position 1
    _publish(rclient, names, rid, 2, [(2, 98), (3, 97), (4, 96)], finish=True)
    events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "aborted" and error["type"] == "server_error" and "position 1" in error["message"]
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == "<10><11><12>", "tokens of the diverging attempt reached the client"
    assert registry.get_sample_value("dex_gateway_divergences_total") == 1
    # the 200 does not hide it: the server span and the error count say ABORTED
    deadline = time.monotonic() + 10
    while not (spans := [sp for sp in exporter.get_finished_spans() if sp.name == "POST /v1/completions"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a = spans[0].attributes
    assert (a["http.response.status_code"], a["dex.status"], a["error.type"]) == (200, "ABORTED", "ABORTED")
    assert spans[0].status.status_code.name == "ERROR"
    assert DIVERGENCE_EVENT in [e.name for e in spans[0].events]
    assert registry.get_sample_value("dex_gateway_errors_total", {"door": "http", "code": "ABORTED"}) == 1


def test_drain_ends_open_http_streams_and_refuses_new_ones(make_gateway, rclient, names):
    gw = make_gateway(http_port=0, settings=GRACE)
    conn = _http(gw)
    _send(conn, {"prompt": "x", "max_tokens": 50, "stream": True})
    _wait_enqueued(rclient, names)
    (rid,) = _queued_ids(rclient, names)
    _publish(rclient, names, rid, 1, [(0, 10), (1, 11)])
    resp = conn.getresponse()
    assert resp.status == 200
    gw._loop.call_soon_threadsafe(gw.gateway.core.drain)            # what SIGTERM starts (Gateway.stop)
    events = _sse_events(resp)                                      # the open stream ends...
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "unavailable"
    assert "shutting down" in events[-2]["error"]["message"]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "<10><11>"
    late = _http(gw)
    _send(late, {"prompt": "late", "max_tokens": 2})                # ...and new requests are refused
    status, body = _answer(late)
    assert status == 503 and "shutting down" in body["error"]["message"]
    assert rclient.exists(names.cancel(rid)) and not rclient.exists(names.grace(rid))
