"""Resumable clients and gateway drain, with real Redis, real gRPC and a worker process: a client
that loses its stream re-attaches with `resume_from` within the resume grace period and gets the
rest exactly (the request never stopped); a gateway that shuts down ends its streams with
UNAVAILABLE and the Python client resumes through the next gateway by itself; after the grace
period without a client the request is cancelled and its worker freed."""

from __future__ import annotations

import dataclasses
import time
import uuid

from dexserve.client import build_request, stream_generate
from dexserve.contract.request import GenerationRequest
from dexserve.gateway.config import GatewayConfig
from dexserve.gateway.server import BackgroundGateway
from dexserve.queue.protocol import GROUP
from dexserve.v1 import dex_pb2 as pb
from dexserve.worker.standin import InstantEngine

from .conftest import TEST_SETTINGS
from .helpers import collect, run_direct, stub, token_events

GRACE = dataclasses.replace(TEST_SETTINGS, resume_grace_s=10.0)


def _direct(model, prompt, n):
    return run_direct(InstantEngine.load(str(model)), GenerationRequest("d", prompt, n))


def test_a_client_that_left_resumes_within_the_grace_period(make_gateway, workers, rclient, names, standin_model):
    gw = make_gateway(settings=GRACE)
    workers.start("--standin-delay", "0.05")
    workers.wait_ready(rclient, 1)
    rid = "resume-" + uuid.uuid4().hex[:6]
    req = build_request("def resumed():", max_new_tokens=40, request_id=rid)
    ch, s = stub(gw.address)
    with ch:
        first = []
        call = s.Generate(req, timeout=60)
        for chunk in call:
            first.append(chunk)
            if sum(len(c.token_ids) for c in first) >= 5:
                break
        call.cancel()                                   # the connection is gone
        time.sleep(1.0)                                 # ... for a while: the request keeps running
        got = first and collect(first)
        req.resume_from = len(got[0])
        rest = list(s.Generate(req, timeout=60))
    ids, text, positions, reason = collect(first + rest)
    assert positions == list(range(40)), "a gap or a duplicate position across the reconnect"
    assert (ids, text) == _direct(standin_model, "def resumed():", 40)[:2]
    assert reason == pb.FINISH_REASON_LENGTH
    events = token_events(rclient, names, rid)
    assert {e.attempt for e in events} == {1}, "the request was restarted instead of kept running"
    assert not any(e.HasField("finish") and e.finish.reason == pb.FINISH_REASON_CANCELLED for e in events)


def test_after_the_grace_period_the_request_is_cancelled_and_its_worker_freed(make_gateway, workers, rclient,
                                                                              names):
    gw = make_gateway(settings=dataclasses.replace(TEST_SETTINGS, resume_grace_s=0.5))
    workers.start("--standin-delay", "0.05")
    workers.wait_ready(rclient, 1)
    rid = "orphan-" + uuid.uuid4().hex[:6]
    ch, s = stub(gw.address)
    with ch:
        call = s.Generate(build_request("def orphan():", max_new_tokens=500, request_id=rid), timeout=60)
        for i, _ in enumerate(call):
            if i == 2:
                break
        call.cancel()
    left = time.monotonic()
    deadline = left + 15
    while not any(e.HasField("finish") for e in token_events(rclient, names, rid)):
        assert time.monotonic() < deadline, "the orphaned request was never cancelled"
        time.sleep(0.05)
    assert time.monotonic() - left >= 0.4, "cancelled before its grace period ended"
    assert token_events(rclient, names, rid)[-1].finish.reason == pb.FINISH_REASON_CANCELLED
    assert not rclient.xpending(names.requests, GROUP)["pending"]


def test_gateway_drain_the_client_resumes_through_the_next_gateway(redis_server, workers, rclient, names,
                                                                   standin_model):
    def gateway(port: int) -> BackgroundGateway:
        return BackgroundGateway(GatewayConfig(redis_url=redis_server.url, port=port, model=str(standin_model),
                                               names=names, settings=GRACE))

    workers.start("--standin-delay", "0.05")
    workers.wait_ready(rclient, 1)
    first = gateway(0)
    second = None
    rid = "drain-" + uuid.uuid4().hex[:6]
    chunks = []
    try:
        for chunk in stream_generate(first.address, "class Rolling:", max_new_tokens=50, request_id=rid,
                                     timeout=60):
            chunks.append(chunk)
            if second is None and sum(len(c.token_ids) for c in chunks) >= 8:
                first.stop()                              # SIGTERM's path: drain, then stop
                second = gateway(first.port)              # the rolling update's replacement, same address
    finally:
        if second is not None:
            second.stop()
        else:
            first.stop()
    assert second is not None
    ids, text, positions, reason = collect(chunks)
    assert positions == list(range(50)), "a gap or a duplicate position across the drain"
    assert (ids, text) == _direct(standin_model, "class Rolling:", 50)[:2]
    assert reason == pb.FINISH_REASON_LENGTH
    assert {e.attempt for e in token_events(rclient, names, rid)} == {1}, "the drain restarted the request"
