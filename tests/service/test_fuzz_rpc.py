"""Every field of every RPC at its extremes against a real gateway and worker (hypothesis; real
Redis, real gRPC over loopback, a stand-in worker process): each call gets OK or the right error
status with a message naming the field, the server keeps serving, and a plain request afterwards
returns exactly its expected output. (The engine side of the same fields, with a real DexEngine:
tests/engine/test_request_fuzz.py.)"""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dexserve.contract.request import GenerationRequest
from dexserve.v1 import dex_pb2 as pb
from dexserve.worker.standin import InstantEngine

from .helpers import run_direct, stub

FIELDS = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields}
INT32 = st.one_of(st.sampled_from([0, 1, -1, 4, 1024, 1025, -(2**31), 2**31 - 1]), st.integers(-(2**31), 2**31 - 1))
FLOAT = st.one_of(st.sampled_from([0.0, -0.0, 5e-324, 0.009, 0.01, 1.0, 100.0, 100.5, 1e308, math.inf, -math.inf,
                                   math.nan]), st.floats())
TEXT = st.one_of(st.sampled_from(["", "x", "\x00\x01\x7f", "\u202e\u200b", "😀𝕏" * 4, "a" * 70_000]),
                 st.text(max_size=30))


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=draw(st.one_of(st.just("def f(x):"), TEXT)),
                             model=draw(st.one_of(st.just(""), st.just("standin-model"), TEXT)),
                             temperature=draw(FLOAT), top_k=draw(INT32),
                             seed=draw(st.one_of(st.sampled_from([0, 2**32, 2**63, 2**64 - 1]),
                                                 st.integers(0, 2**64 - 1))),
                             request_id=draw(st.one_of(st.just(""), TEXT.map(lambda t: t[:200]))))
    if draw(st.booleans()):
        req.max_new_tokens = draw(INT32)
    if draw(st.booleans()):
        req.top_p = draw(FLOAT)
    if draw(st.booleans()):
        req.resume_from = draw(st.sampled_from([0, 1, 3, 1024, 1025, 2**32 - 1]))
    req.stop.extend(draw(st.one_of(st.lists(TEXT.map(lambda t: t[:80]), max_size=10),
                                   st.just(["x"] * 5000))))
    return req


ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
          grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture
def served(make_gateway, workers, rclient, standin_model):
    gw = make_gateway()
    workers.start()
    workers.wait_ready(rclient, 1)
    ch, s = stub(gw.address)
    want = run_direct(InstantEngine.load(str(standin_model)), GenerationRequest("d", "plain", 5))
    yield s, want
    ch.close()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(req=requests())
def test_every_field_at_its_extremes(served, req):
    s, want = served
    for call in (lambda: s.Complete(req, timeout=30), lambda: list(s.Generate(req, timeout=30))):
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() in ERRORS, f"{exc.code()}: {exc.details()}"
            assert len(exc.details()) < 400, "an error message echoes the request"
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                field = exc.details().split(":", 1)[0]
                assert field in FIELDS, f"no field named in {exc.details()!r}"
    ok = s.Complete(pb.GenerateRequest(prompt="plain", max_new_tokens=5), timeout=30)
    assert (list(ok.token_ids), ok.text) == (want[0], want[1])
