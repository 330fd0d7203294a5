"""Failure paths with real processes: kill -9 a worker mid-stream, cancel and
deadline, dead-lettering, SIGTERM hand-back, auth, backpressure, TLS, and a
Redis restart that keeps queued requests (AOF)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import grpc
import pytest
import redis

from dexserve.client import build_request, stream_generate
from dexserve.contract.request import GenerationRequest
from dexserve.queue.embedded import EmbeddedRedis
from dexserve.queue.protocol import GROUP, QueueSettings
from dexserve.v1 import dex_pb2 as pb
from dexserve.worker.standin import InstantEngine

from .helpers import collect, run_direct, stub, token_events


def _direct(model, prompt, n):
    return run_direct(InstantEngine.load(str(model)), GenerationRequest("d", prompt, n))


def _holder_pid(client, names, timeout=10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.xpending_range(names.requests, GROUP, "-", "+", 10)
        if rows:
            return int(rows[0]["consumer"].decode().rsplit("-", 1)[1])
        time.sleep(0.02)
    raise TimeoutError("no worker took the request")


def test_kill9_worker_mid_stream_no_gap_no_duplicate(make_gateway, workers, rclient, names, standin_model):
    gw = make_gateway()
    procs = {p.pid: p for p in (workers.start("--standin-delay", "0.04"), workers.start("--standin-delay", "0.04"))}
    workers.wait_ready(rclient, 2)
    rid = "kill-" + uuid.uuid4().hex[:6]
    chunks = []
    killed = None
    for chunk in stream_generate(gw.address, "class Node:", max_new_tokens=50, request_id=rid, timeout=60):
        chunks.append(chunk)
        if killed is None and sum(len(c.token_ids) for c in chunks) >= 8:
            killed = _holder_pid(rclient, names)
            os.kill(killed, signal.SIGKILL)
            procs[killed].wait()
    ids, text, positions, reason = collect(chunks)
    assert positions == list(range(50)), "a gap or a duplicate position"
    assert (ids, text) == _direct(standin_model, "class Node:", 50)[:2]
    assert reason == pb.FINISH_REASON_LENGTH
    attempts = {e.attempt for e in token_events(rclient, names, rid)}
    assert attempts == {1, 2}, f"expected a restart by the surviving worker, saw attempts {attempts}"


def _flag_time_ns(rclient, names, rid, timeout=5.0) -> int:
    """When the gateway's cancel flag became visible to workers."""
    deadline = time.monotonic() + timeout
    while not rclient.exists(names.cancel(rid)):
        assert time.monotonic() < deadline, "the cancel never reached the queue"
        time.sleep(0.002)
    return time.time_ns()


def _assert_stopped_within_a_round(rclient, names, rid, t_stop_ns, timeout=5.0):
    """After the flag is set, the worker commits at most the round in progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = token_events(rclient, names, rid)
        if events and events[-1].HasField("finish"):
            break
        time.sleep(0.05)
    assert events[-1].finish.reason == pb.FINISH_REASON_CANCELLED
    late = [t for e in events if e.commit_unix_nanos > t_stop_ns for t in e.tokens]
    assert len(late) <= 1, f"{len(late)} tokens committed after the client left"
    assert not rclient.xpending(names.requests, GROUP)["pending"]


def test_client_cancel_stops_worker_within_one_round(make_gateway, workers, rclient, names):
    gw = make_gateway()
    workers.start("--standin-delay", "0.1")
    workers.wait_ready(rclient, 1)
    rid = "cancel-" + uuid.uuid4().hex[:6]
    ch, s = stub(gw.address)
    with ch:
        call = s.Generate(build_request("def slow():", max_new_tokens=500, request_id=rid), timeout=60)
        for i, _ in enumerate(call):
            if i == 2:
                break
        call.cancel()
        t_flag = _flag_time_ns(rclient, names, rid)
    _assert_stopped_within_a_round(rclient, names, rid, t_flag)


def test_deadline_stops_worker_within_one_round(make_gateway, workers, rclient, names):
    gw = make_gateway()
    workers.start("--standin-delay", "0.1")
    workers.wait_ready(rclient, 1)
    rid = "deadline-" + uuid.uuid4().hex[:6]
    flag: list[int] = []
    watcher = threading.Thread(target=lambda: flag.append(_flag_time_ns(rclient, names, rid, timeout=10)))
    watcher.start()
    with pytest.raises(grpc.RpcError) as err:
        list(stream_generate(gw.address, "def slow():", max_new_tokens=500, request_id=rid, timeout=0.6))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    watcher.join()
    _assert_stopped_within_a_round(rclient, names, rid, flag[0])


def test_dead_letter_after_max_attempts(make_gateway, workers, rclient, names):
    gw = make_gateway()
    workers.start("--standin-poison", "POISON")
    workers.wait_ready(rclient, 1)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stream_generate(gw.address, "POISON pill", max_new_tokens=5, timeout=30))
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "dead-lettered after 3 failed attempts" in err.value.details()
    assert time.monotonic() - t0 < 15
    [(_id, fields)] = rclient.xrange(names.dead_letter)
    assert pb.QueuedRequest.FromString(fields[b"m"]).attempt == 3
    # the worker is still healthy
    assert collect(stream_generate(gw.address, "fine", max_new_tokens=3, timeout=30))[2] == [0, 1, 2]


def test_sigterm_hands_back_and_exits_zero(make_gateway, workers, rclient, names, standin_model):
    gw = make_gateway()
    first = workers.start("--standin-delay", "0.05", "--grace", "0.2")
    workers.wait_ready(rclient, 1)
    chunks = []
    for chunk in stream_generate(gw.address, "for i in range(3):", max_new_tokens=40, timeout=60):
        chunks.append(chunk)
        if len(chunks) == 5:
            first.send_signal(signal.SIGTERM)
            assert first.wait(10) == 0
            workers.start("--standin-delay", "0.01")
    ids, text, positions, _ = collect(chunks)
    assert positions == list(range(40))
    assert (ids, text) == _direct(standin_model, "for i in range(3):", 40)[:2]


def test_auth(make_gateway):
    gw = make_gateway(auth_token="s3cret")
    ch, s = stub(gw.address)
    with ch:
        for md, needle in (((), "missing"), ((("authorization", "Bearer nope"),), "invalid")):
            with pytest.raises(grpc.RpcError) as err:
                s.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and needle in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(s.Generate(build_request("x", max_new_tokens=2), metadata=md, timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = s.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer s3cret"),), timeout=5)
        assert ok.models


def test_backpressure_full_queue(make_gateway, rclient, names):
    gw = make_gateway(settings=QueueSettings(maxlen=2, claim_idle_ms=1000, heartbeat_interval_s=0.2))
    ch, s = stub(gw.address)
    with ch:
        waiting = [s.Generate(build_request(f"q{i}", max_new_tokens=2), timeout=30) for i in range(2)]
        deadline = time.monotonic() + 10
        while rclient.xlen(names.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as err:
            list(s.Generate(build_request("q3", max_new_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rclient.xlen(names.requests) == 2
        for call in waiting:
            call.cancel()


def test_tls(make_gateway, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    gw = make_gateway(tls_cert=str(cert), tls_key=str(key))
    with grpc.secure_channel(gw.address, grpc.ssl_channel_credentials(cert.read_bytes())) as ch:
        from dexserve.v1 import dex_pb2_grpc

        assert dex_pb2_grpc.DexServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models
    with grpc.insecure_channel(gw.address) as ch, pytest.raises(grpc.RpcError):
        stub(gw.address)[1].ListModels(pb.ListModelsRequest(), timeout=3)


def test_redis_restart_keeps_queued_requests(make_gateway, workers, names, tmp_path, standin_model):
    server = EmbeddedRedis(tmp_path / "aof-redis", appendfsync="always").start()
    try:
        gw = make_gateway(redis_url=server.url)
        results: dict[int, tuple] = {}

        def one(i):
            results[i] = collect(stream_generate(gw.address, f"queued {i}", max_new_tokens=6, timeout=60))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 10
        while client.xlen(names.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.xlen(names.requests) == 3
        client.close()
        server.stop(kill=True)                       # crash: only the AOF survives
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.xlen(names.requests) == 3
        workers.start(url=server.url)
        for t in threads:
            t.join(60)
        for i in range(3):
            ids, text, positions, _ = results[i]
            assert positions == list(range(6))
            assert (ids, text) == _direct(standin_model, f"queued {i}", 6)[:2]
        client.close()
    finally:
        workers.stop_all()
        server.stop()
