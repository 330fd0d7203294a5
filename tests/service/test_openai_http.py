"""The OpenAI-compatible HTTP door, end to end: the official `openai` client (and curl for the
SSE framing) against a real gateway (gRPC and HTTP on one core), real Redis and stand-in
workers as subprocesses. Outputs are compared with the stand-in engine's own, run directly."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import grpc
import openai
import pytest
import redis

from dexserve.client import complete, stream_generate
from dexserve.contract.chat import Message
from dexserve.contract.model_card import ModelCard, card_json
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.gateway.config import GatewayConfig
from dexserve.gateway.server import BackgroundGateway
from dexserve.queue.protocol import QueueNames
from dexserve.v1 import dex_pb2 as pb
from dexserve.worker.standin import InstantEngine

from tiny_models import copy_checkpoint, with_chat_template

from .conftest import TEST_SETTINGS, standin_service
from .helpers import collect, run_direct, stub

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def chat_model(standin_model, tmp_path_factory):
    """The stand-in checkpoint with a chat template."""
    return with_chat_template(copy_checkpoint(standin_model, tmp_path_factory.mktemp("m") / "standin-chat"))


@pytest.fixture(scope="module")
def service(redis_server, chat_model, tmp_path_factory):
    """One gateway with both doors and two stand-in workers (8 slots each, 10 ms rounds)."""
    with standin_service(redis_server.url, chat_model, tmp_path_factory.mktemp("wlogs"), "h", http_port=0) as svc:
        yield svc


@pytest.fixture(scope="module")
def oai(service):
    gw = service[0]
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def _direct(model, prompt, n, temperature=0.0, seed=0, stop=(), logprobs=None):
    engine = InstantEngine.load(str(model))
    req = GenerationRequest("direct", prompt, n, SamplingParams(temperature=temperature, seed=seed), tuple(stop),
                            logprobs=logprobs)
    return run_direct(engine, req)


def _rendered(model, messages) -> str:
    return ModelCard.load(model).chat_template().render([Message(m["role"], m["content"]) for m in messages])


def _post(url: str, body: bytes | dict, token: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- completions and chat, streaming and not --------------------------------------------------

def test_completion_equals_the_engine_output(oai, chat_model):
    ids, text, _ = _direct(chat_model, "def add(a, b):", 12)
    out = oai.completions.create(model="standin-chat", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "standin-chat"
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    assert out.choices[0].logprobs is None
    assert (out.usage.completion_tokens, out.usage.total_tokens) == (12, out.usage.prompt_tokens + 12)
    assert out.usage.prompt_tokens == ModelCard.load(chat_model).prompt_tokenizer().count("def add(a, b):")
    # the DEX extension rides as an extra key the official client keeps (the stand-in: one token per round)
    assert out.usage.model_extra["dex"] == {"explorers": 0, "rounds": 12, "rpt": 1.0, "mode": "standin"}


def test_streamed_completion_with_usage(oai, chat_model):
    _, text, _ = _direct(chat_model, "import os", 10)
    chunks = list(oai.completions.create(model="standin-chat", prompt="import os", max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.model_extra["dex"] == {"explorers": 0, "rounds": 10, "rpt": 1.0, "mode": "standin"}
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_chat_renders_the_template_and_streams(oai, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sum a list"}]
    _, text, _ = _direct(chat_model, _rendered(chat_model, messages), 9)
    out = oai.chat.completions.create(model="standin-chat", messages=messages, max_completion_tokens=9,
                                      temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == text
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 9
    chunks = list(oai.chat.completions.create(model="standin-chat", messages=messages, max_tokens=9, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_before_them(oai, chat_model):
    _, text, _ = _direct(chat_model, "x = 1", 20)
    stop = text.split()[4]                     # the fifth token's text
    ids, want, reason = _direct(chat_model, "x = 1", 20, stop=(stop,))
    assert reason == "stop" and want == text[:text.index(stop)]
    out = oai.completions.create(model="standin-chat", prompt="x = 1", max_tokens=20, temperature=0, stop=stop)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (want, "stop")
    assert out.usage.completion_tokens == len(ids)
    streamed = list(oai.completions.create(model="standin-chat", prompt="x = 1", max_tokens=20, temperature=0,
                                           stop=["nothing-like-it", stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_and_sampling_defaults_differ(oai, chat_model):
    args = dict(model="standin-chat", prompt="def f(x):", max_tokens=16, temperature=0.8)
    a = oai.completions.create(seed=5, **args).choices[0].text
    assert a == oai.completions.create(seed=5, **args).choices[0].text == _direct(chat_model, "def f(x):", 16,
                                                                                0.8, 5)[1]
    assert a != oai.completions.create(seed=6, **args).choices[0].text
    # OpenAI's defaults: temperature 1, and no seed means a fresh one per request
    unseeded = {oai.completions.create(model="standin-chat", prompt="def f(x):", max_tokens=16).choices[0].text
                for _ in range(3)}
    assert len(unseeded) == 3


# ---- log-probabilities ------------------------------------------------------------------------

def test_completion_logprobs_in_openai_shape(oai, chat_model):
    engine = InstantEngine.load(str(chat_model))
    req = GenerationRequest("d", "def g():", 6, logprobs=3)
    tok = ModelCard.load(chat_model).prompt_tokenizer()
    for stream in (False, True):
        resp = oai.completions.create(model="standin-chat", prompt="def g():", max_tokens=6, temperature=0,
                                      logprobs=3, stream=stream)
        parts = [c.choices[0].logprobs for c in resp if c.choices[0].logprobs] if stream else [resp.choices[0].logprobs]
        tokens = [t for p in parts for t in p.tokens]
        token_lps = [x for p in parts for x in p.token_logprobs]
        tops = [x for p in parts for x in p.top_logprobs]
        offsets = [x for p in parts for x in p.text_offset]
        want_ids = [engine.token_at(req, i) for i in range(6)]
        assert tokens == [tok.token_text(t) for t in want_ids]
        assert token_lps == [engine.logprobs_at(req, i)[0] for i in range(6)]
        assert tops == [{tok.token_text(t): lp for t, lp in engine.logprobs_at(req, i)[1]} for i in range(6)]
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(6)]


def test_chat_logprobs_with_bytes_and_alternatives(oai, chat_model):
    messages = [{"role": "user", "content": "hi"}]
    engine = InstantEngine.load(str(chat_model))
    req = GenerationRequest("d", _rendered(chat_model, messages), 5, logprobs=2)
    tok = ModelCard.load(chat_model).prompt_tokenizer()
    out = oai.chat.completions.create(model="standin-chat", messages=messages, max_tokens=5, temperature=0,
                                      logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for i, entry in enumerate(content):
        token = engine.token_at(req, i)
        lp, top = engine.logprobs_at(req, i)
        assert (entry.token, entry.logprob, entry.bytes) == (tok.token_text(token), lp, list(tok.token_bytes(token)))
        assert [(t.token, t.logprob, t.bytes) for t in entry.top_logprobs] == \
            [(tok.token_text(t), v, list(tok.token_bytes(t))) for t, v in top]
    only = oai.chat.completions.create(model="standin-chat", messages=messages, max_tokens=2, logprobs=True)
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[], []]
    assert oai.chat.completions.create(model="standin-chat", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_logprobs_refused_when_the_workers_card_says_so(redis_server, chat_model):
    """A worker whose engine reports no log-probabilities publishes that in its card: 400, naming logprobs."""
    names = QueueNames(f"n{uuid.uuid4().hex[:8]}")
    card = ModelCard.load(chat_model)
    gw = BackgroundGateway(GatewayConfig(redis_url=redis_server.url, port=0, http_port=0, model=str(chat_model),
                                         names=names, settings=TEST_SETTINGS))
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set(names.model_card(), card_json(card, gw.gateway.served.limits, logprobs=False))
        status, body = _post(f"{gw.http_url}/v1/completions", {"prompt": "x", "logprobs": 1})
        assert status == 400 and body["error"]["param"] == "logprobs"
        assert "logprobs: not supported by this worker" in body["error"]["message"]
        status, body = _post(f"{gw.http_url}/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2})
        assert status == 400 and body["error"]["param"] == "logprobs"
        with pytest.raises(grpc.RpcError) as err:
            list(stream_generate(gw.address, "x", logprobs=1, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.value.details()
    finally:
        gw.stop()
        client.close()


# ---- the gRPC door: the same messages form and logprobs ------------------------------------------

def test_grpc_messages_and_logprobs(service, chat_model):
    gw = service[0]
    messages = [{"role": "user", "content": "sum a list"}]
    want_ids, want_text, _ = _direct(chat_model, _rendered(chat_model, messages), 7)
    ids, text, positions, reason = collect(stream_generate(gw.address, "", messages=messages, max_new_tokens=7,
                                                           timeout=30))
    assert (ids, text, positions) == (want_ids, want_text, list(range(7)))
    engine = InstantEngine.load(str(chat_model))
    req = GenerationRequest("d", "def h():", 5, logprobs=4)
    resp = complete(gw.address, "def h():", max_new_tokens=5, logprobs=4, timeout=30)
    assert [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top_logprobs]) for lp in resp.logprobs] == \
        [(engine.logprobs_at(req, i)[0], list(engine.logprobs_at(req, i)[1])) for i in range(5)]
    plain = complete(gw.address, "def h():", max_new_tokens=5, timeout=30)
    assert list(plain.token_ids) == list(resp.token_ids) and len(plain.logprobs) == 0
    assert (plain.usage.dex.explorers, plain.usage.dex.rounds, plain.usage.dex.mode) == (0, 5, "standin")
    final = list(stream_generate(gw.address, "def h():", max_new_tokens=5, timeout=30))[-1]
    assert final.finish_reason and final.usage.dex.rounds == 5 and final.usage.completion_tokens == 5
    channel, dex = stub(gw.address)
    with channel:
        assert dex.ListModels(pb.ListModelsRequest(), timeout=5).models[0].chat is True


GRPC_BAD = [
    (dict(prompt="x", messages=[{"role": "user", "content": "y"}]), "messages: give either prompt or messages"),
    (dict(messages=[{"role": "", "content": "y"}]), "messages[0].role"),
    (dict(messages=[{"role": "tool", "content": "y"}]), "unknown role tool"),
    (dict(prompt="x", logprobs=21), "logprobs: must be in 0..20"),
    (dict(messages=[{"role": "user", "content": "def f(x): return x\n" * 400}]), "messages:"),
]


@pytest.mark.parametrize("fields,needle", GRPC_BAD, ids=[n for _, n in GRPC_BAD])
def test_grpc_chat_and_logprobs_bad_inputs(service, fields, needle):
    args = dict(prompt="", max_new_tokens=4)
    args.update(fields)
    prompt = args.pop("prompt")
    with pytest.raises(grpc.RpcError) as err:
        list(stream_generate(service[0].address, prompt, timeout=10, **args))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_model_without_template_refuses_chat(make_gateway, standin_model):
    gw = make_gateway(http_port=0)
    status, body = _post(f"{gw.http_url}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages" and "no chat template" in body["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        list(stream_generate(gw.address, "", messages=[{"role": "user", "content": "x"}], timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no chat template" in err.value.details()


# ---- bad input: status, OpenAI's error shape, the parameter named ---------------------------------

LONG = "def f(x): return x\n" * 400
BAD = [
    ("completions", dict(prompt=""), 400, "prompt"),
    ("completions", dict(prompt=LONG), 400, "prompt"),
    ("completions", dict(prompt=["a", "b"]), 400, "prompt"),
    ("completions", dict(prompt=[1, 2, 3]), 400, "prompt"),
    ("completions", dict(max_tokens=0), 400, "max_tokens"),
    ("completions", dict(max_tokens=100_000), 400, "max_tokens"),
    ("completions", dict(max_tokens="ten"), 400, "max_tokens"),
    ("completions", dict(max_tokens=10**12), 400, "max_tokens"),
    ("completions", dict(seed=2**64), 400, "seed"),
    ("completions", dict(temperature="hot"), 400, "temperature"),
    ("completions", dict(stream="yes"), 400, "stream"),
    ("completions", dict(temperature=-1), 400, "temperature"),
    ("completions", dict(top_p=0), 400, "top_p"),
    ("completions", dict(top_p=1.5), 400, "top_p"),
    ("completions", dict(n=2), 400, "n"),
    ("completions", dict(seed=-1), 400, "seed"),
    ("completions", dict(stop=[f"s{i}" for i in range(9)]), 400, "stop"),
    ("completions", dict(stop=[""]), 400, "stop"),
    ("completions", dict(stop=5), 400, "stop"),
    ("completions", dict(logprobs=21), 400, "logprobs"),
    ("completions", dict(echo=True), 400, "echo"),
    ("completions", dict(frequency_penalty=0.5), 400, "frequency_penalty"),
    ("completions", dict(stream_options={"include_usage": True}), 400, "stream_options"),
    ("completions", dict(stream=True, temperature=-1), 400, "temperature"),
    ("completions", dict(model="gpt-17"), 404, "model"),
    ("chat/completions", dict(messages=[]), 400, "messages"),
    ("chat/completions", dict(messages="hello"), 400, "messages"),
    ("chat/completions", dict(messages=[{"content": "x"}]), 400, "messages[0].role"),
    ("chat/completions", dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content[0]"),
    ("chat/completions", dict(messages=[{"role": "tool", "content": "x"}]), 400, "messages"),
    ("chat/completions", dict(messages=[{"role": "user", "content": LONG}]), 400, "messages"),
    ("chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2), 400, "top_logprobs"),
    ("chat/completions", dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=25), 400,
     "top_logprobs"),
    ("chat/completions", dict(messages=[{"role": "user", "content": "x"}], max_completion_tokens=0), 400,
     "max_completion_tokens"),
    ("chat/completions", dict(messages=[{"role": "user", "content": "x"}], n=3), 400, "n"),
    ("chat/completions", dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]), 400,
     "tools"),
    ("chat/completions", dict(messages=[{"role": "user", "content": "x"}], model="gpt-17"), 404, "model"),
]


@pytest.mark.parametrize("path,fields,status,param", BAD, ids=[f"{b[0]}:{'+'.join(b[1])}:{b[3]}" for b in BAD])
def test_bad_input_maps_to_status_and_error_shape(service, path, fields, status, param):
    gw = service[0]
    body = dict(model="standin-chat", max_tokens=4) if path == "completions" else dict(model="standin-chat")
    if path == "completions":
        body["prompt"] = "def f():"
    body.update(fields)
    got, err = _post(f"{gw.http_url}/v1/{path}", body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"].startswith(param.split("[")[0]), err
    assert err["error"]["type"] == "invalid_request_error"
    if status == 404:
        assert err["error"]["code"] == "model_not_found"


def test_bad_input_through_the_openai_client_and_bad_json(service, oai):
    gw = service[0]
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="standin-chat", prompt="x", max_tokens=4, temperature=-2)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    for raw in (b"{not json", b"[1, 2]"):
        status, body = _post(f"{gw.http_url}/v1/completions", raw)
        assert status == 400 and body["error"]["param"] == "body"
    status, body = _post(f"{gw.http_url}/v1/nothing", {})
    assert status == 404 and body["error"]["code"] == "not_found"


def test_queue_full_is_429_and_draining_is_503(redis_server, chat_model):
    names = QueueNames(f"q{uuid.uuid4().hex[:8]}")
    full = dataclasses.replace(TEST_SETTINGS, maxlen=1)
    gw = BackgroundGateway(GatewayConfig(redis_url=redis_server.url, port=0, http_port=0, model=str(chat_model),
                                         names=names, settings=full))
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.xadd(names.requests, {"m": b"placeholder"})            # the queue holds maxlen entries
        status, body = _post(f"{gw.http_url}/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error" and "full" in body["error"]["message"]
        with urllib.request.urlopen(f"{gw.http_url}/health", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        gw.gateway.core.draining = True
        status, body = _post(f"{gw.http_url}/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and body["error"]["type"] == "server_error"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{gw.http_url}/health", timeout=10)
        assert err.value.code == 503
    finally:
        gw.stop()
        client.close()


# ---- auth, models, health ----------------------------------------------------------------------------

def test_bearer_token_is_the_grpc_one(make_gateway, chat_model, workers, rclient):
    gw = make_gateway(http_port=0, auth_token=TOKEN, model=str(chat_model))
    workers.start(model=chat_model)
    workers.wait_ready(rclient, 1)
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            bad.completions.create(model="standin-chat", prompt="x", max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        assert "invalid bearer token" in err.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    status, body = _post(f"{gw.http_url}/v1/completions", {"prompt": "x", "max_tokens": 2})   # no header at all
    assert status == 401 and "missing bearer token" in body["error"]["message"]
    with openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key=TOKEN, max_retries=0) as good:
        assert good.completions.create(model="standin-chat", prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert [m.id for m in good.models.list()] == ["standin-chat"]
    with urllib.request.urlopen(f"{gw.http_url}/health", timeout=10) as resp:    # probes carry no token
        assert resp.status == 200
    with pytest.raises(grpc.RpcError) as err:
        list(stream_generate(gw.address, "x", max_new_tokens=2, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert collect(stream_generate(gw.address, "x", max_new_tokens=2, token=TOKEN, timeout=30))[2] == [0, 1]


def test_models_endpoint(oai):
    (model,) = oai.models.list().data
    assert (model.id, model.object, model.owned_by) == ("standin-chat", "model", "dexserve")
    assert model.model_extra["max_model_len"] == 512


# ---- SSE framing on the wire, and a client that leaves ------------------------------------------------

def test_curl_sees_sse_framing(service, chat_model):
    curl = shutil.which("curl")
    assert curl, "curl is part of the test environment (apt curl)"
    gw = service[0]
    _, text, _ = _direct(chat_model, "print(", 6)
    out = subprocess.run([curl, "-sN", "--max-time", "30", f"{gw.http_url}/v1/completions",
                          "-H", "content-type: application/json",
                          "-d", json.dumps({"prompt": "print(", "max_tokens": 6, "temperature": 0, "stream": True})],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.endswith("data: [DONE]\n\n")
    events = out.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads) == text
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    head = subprocess.run([curl, "-sN", "-D", "-", "-o", "/dev/null", "--max-time", "30",
                           f"{gw.http_url}/v1/chat/completions", "-H", "content-type: application/json",
                           "-d", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                             "stream": True})],
                          capture_output=True, text=True, timeout=60, check=True).stdout.lower()
    assert head.startswith("http/1.1 200") and "content-type: text/event-stream" in head


def test_a_client_that_leaves_cancels_its_request(service):
    gw, names, client = service
    body = json.dumps({"prompt": "while True:", "max_tokens": 1000, "stream": True}).encode()
    req = urllib.request.Request(f"{gw.http_url}/v1/completions", body, {"content-type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=30)
    first = json.loads(resp.readline()[len(b"data: "):])
    rid = first["id"].removeprefix("cmpl-")
    resp.close()
    deadline = time.monotonic() + 60
    while not (events := [pb.StreamEvent.FromString(f[b"e"]) for _, f in client.xrange(names.tokens(rid))]) \
            or not events[-1].HasField("finish"):
        assert time.monotonic() < deadline, "the request never finished"
        time.sleep(0.05)
    assert client.exists(names.cancel(rid))
    assert events[-1].finish.reason == pb.FINISH_REASON_CANCELLED      # not its length nor the context


def test_a_taken_http_port_fails_the_start_clearly(redis_server, chat_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="HTTP door: cannot listen on 127.0.0.1"):
            BackgroundGateway(GatewayConfig(redis_url=redis_server.url, port=0, http_port=taken.getsockname()[1],
                                            model=str(chat_model), names=QueueNames("taken"),
                                            settings=TEST_SETTINGS))


def test_require_workers_refuses_while_none_runs(service, redis_server, chat_model, make_gateway):
    """--require-workers: no live worker (no card in Redis) is a 503 / UNAVAILABLE, not a wait in the queue."""
    alone = make_gateway(http_port=0, model=str(chat_model), require_workers=True)     # its own prefix: no worker
    status, body = _post(f"{alone.http_url}/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and "no worker is running" in body["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        list(stream_generate(alone.address, "x", max_new_tokens=2, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    served = make_gateway(http_port=0, model=str(chat_model), require_workers=True, names=service[1])
    status, body = _post(f"{served.http_url}/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_a_worker_without_logprobs_refuses_them_itself(make_gateway, workers, rclient, chat_model):
    """No card yet (no worker running): the gateway lets a logprobs request queue; the worker that takes it
    refuses it (its engine reports none), and the streaming HTTP client still gets a 400 naming logprobs."""
    import threading

    gw = make_gateway(http_port=0, model=str(chat_model))
    got = {}

    def call():
        got["answer"] = _post(f"{gw.http_url}/v1/completions",
                              {"prompt": "x", "max_tokens": 3, "logprobs": 2, "stream": True})

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 20
    while not rclient.xlen(workers.names.requests):          # queued, nobody to take it yet
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers.start("--standin-no-logprobs", model=chat_model)
    t.join(60)
    status, body = got["answer"]
    assert status == 400 and body["error"]["param"] == "logprobs"
    assert "not supported by this worker" in body["error"]["message"]
    assert json.loads(rclient.get(workers.names.model_card()))["capabilities"] == {"logprobs": False}
