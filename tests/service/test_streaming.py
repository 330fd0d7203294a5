"""End to end through real gRPC and Redis with stand-in workers: equality with
the engine's direct output, concurrency, every bad input, idempotent attach,
health, reflection, ListModels, Complete."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dexserve.client import build_request, complete, stream_generate
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.v1 import dex_pb2 as pb
from dexserve.worker.standin import InstantEngine

from .conftest import standin_service
from .helpers import collect, run_direct, stub, token_events


@pytest.fixture(scope="module")
def service(redis_server, standin_model, tmp_path_factory):
    """One gateway and two stand-in workers (8 slots each, 10 ms rounds) for this module."""
    with standin_service(redis_server.url, standin_model, tmp_path_factory.mktemp("wlogs"), "s") as svc:
        yield svc


def _direct(model, prompt, n, temperature=0.0, seed=0, stop=()):
    engine = InstantEngine.load(str(model))
    req = GenerationRequest("direct", prompt, n, SamplingParams(temperature=temperature, seed=seed), tuple(stop))
    return run_direct(engine, req)


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.8, 7), (0.8, 8)])
def test_stream_equals_direct_output(service, standin_model, temperature, seed):
    gw, _, _ = service
    want_ids, want_text, want_reason = _direct(standin_model, "def add(a, b):", 12, temperature, seed)
    ids, text, positions, reason = collect(stream_generate(
        gw.address, "def add(a, b):", max_new_tokens=12, temperature=temperature, seed=seed, timeout=30))
    assert (ids, text) == (want_ids, want_text)
    assert positions == list(range(12))
    assert pb.FinishReason.Name(reason) == "FINISH_REASON_" + want_reason.upper()


def test_stop_string_and_complete(service, standin_model):
    gw, _, _ = service
    ids, text, _ = _direct(standin_model, "x = 1", 20)
    stop = text.split()[2]   # the third token's text: stops there
    resp = complete(gw.address, "x = 1", max_new_tokens=20, stop=[stop], timeout=30)
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert list(resp.token_ids) == ids[:3]
    assert resp.usage.completion_tokens == 3


def test_two_dozen_concurrent_streams(service, standin_model):
    gw, _, _ = service
    prompts = [f"def f{i}(x):" for i in range(24)]

    def one(i):
        return collect(stream_generate(gw.address, prompts[i], max_new_tokens=16, temperature=0.5, seed=i,
                                       timeout=60))

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    for i, (ids, text, positions, reason) in enumerate(results):
        want_ids, want_text, _ = _direct(standin_model, prompts[i], 16, 0.5, i)
        assert (ids, text, positions) == (want_ids, want_text, list(range(16)))
        assert reason == pb.FINISH_REASON_LENGTH


def _bad_utf8_call(address):
    raw = pb.GenerateRequest(prompt="abc", max_new_tokens=4).SerializeToString().replace(b"abc", b"a\xffc")
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/dexserve.v1.DexService/Generate", request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateChunk.FromString)
        list(call(raw, timeout=10))


BAD = [
    ("empty prompt", dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("over context", dict(prompt="def f(x): return x\n" * 400), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("negative temperature", dict(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("top_p zero", dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top_p above one", dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("negative top_k", dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ("max_new_tokens over limit", dict(max_new_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("max_new_tokens zero", dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("unknown model", dict(model="gpt-17"), grpc.StatusCode.NOT_FOUND, "gpt-17"),
    ("too many stops", dict(stop=[f"s{i}" for i in range(9)]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ("request id too long", dict(request_id="r" * 500), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
]


def test_bad_inputs_while_another_stream_streams(service, standin_model):
    gw, _, _ = service
    got: dict = {}

    def long_stream():
        got["result"] = collect(stream_generate(gw.address, "while True:", max_new_tokens=60, timeout=60))

    t = threading.Thread(target=long_stream)
    t.start()
    ch, s = stub(gw.address)
    with ch:
        for label, fields, code, needle in BAD:
            args = dict(prompt="def f():", max_new_tokens=4)
            args.update(fields)
            with pytest.raises(grpc.RpcError) as err:
                list(s.Generate(build_request(**args), timeout=10))
            assert err.value.code() == code, label
            assert needle in err.value.details(), (label, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        _bad_utf8_call(gw.address)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in err.value.details() and "UTF-8" in err.value.details()
    t.join(60)
    ids, text, positions, reason = got["result"]
    assert (ids, text) == _direct(standin_model, "while True:", 60)[:2]
    assert positions == list(range(60)) and reason == pb.FINISH_REASON_LENGTH


def test_repeated_request_id_attaches(service, standin_model):
    gw, names, client = service
    rid = f"retry-{uuid.uuid4().hex[:6]}"
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda: collect(stream_generate(gw.address, "import os", max_new_tokens=30,
                                                               request_id=rid, timeout=60))) for _ in range(3)]
        results = [f.result() for f in futures]
    assert results[0] == results[1] == results[2]
    assert results[0][2] == list(range(30))
    produced = sum(len(e.tokens) for e in token_events(client, names, rid))
    assert produced == 30                    # ran once, not three times
    # after it finished, the same id replays the same stream
    assert collect(stream_generate(gw.address, "import os", max_new_tokens=30, request_id=rid, timeout=30)) == results[0]
    with pytest.raises(grpc.RpcError) as err:   # same id, different body
        list(stream_generate(gw.address, "import sys", max_new_tokens=30, request_id=rid, timeout=30))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_health_reflection_and_models(service):
    gw, _, _ = service
    with grpc.insecure_channel(gw.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        [reply] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        services = {s.name for s in reply.list_services_response.service}
        assert {"dexserve.v1.DexService", "grpc.health.v1.Health"} <= services
        models = stub(gw.address)[1].ListModels(pb.ListModelsRequest(), timeout=5).models
        assert models[0].name == "standin-model" and models[0].max_context == 512
