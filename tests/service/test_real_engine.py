"""The service streams exactly what the real DEX engine outputs directly
(greedy and seeded sampling), with a tiny random Llama and a real worker."""

from __future__ import annotations

from pathlib import Path

import uuid

import pytest

from dexserve.client import stream_generate
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.v1 import dex_pb2 as pb

from .helpers import collect, run_direct

import dexserve.engine.engine as engine_mod  # noqa: E402

pytestmark = pytest.mark.slow
# eager steps: these tests are about the service path, and compiling would add minutes of start-up per worker
ENGINE_FLAGS = ["--explorers", "2", "--width", "2", "--max-batch", "2", "--max-context", "256", "--no-compile"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with the shipped tokenizer and no EOS (every request runs to max_new_tokens)."""
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", eos=False)


def test_streams_equal_direct_engine_output(make_gateway, workers, rclient, tiny_llama):
    cfg = engine_mod.EngineConfig(explorers=2, width=2, max_batch=2, max_context=256)
    engine = engine_mod.DexEngine.load(str(tiny_llama), cfg)
    cases = [("def add(a, b):", SamplingParams()), ("import os\n", SamplingParams(temperature=0.9, top_k=50, seed=11))]
    want = [run_direct(engine, GenerationRequest(f"d{i}", p, 12, s)) for i, (p, s) in enumerate(cases)]
    gw = make_gateway(model=str(tiny_llama), max_context=256)
    workers.start(*ENGINE_FLAGS, engine="dex", model=tiny_llama)
    workers.wait_ready(rclient, 1, timeout=120)
    for (prompt, s), (ids, text, reason) in zip(cases, want):
        got = collect(stream_generate(gw.address, prompt, max_new_tokens=12, temperature=s.temperature,
                                      top_k=s.top_k, seed=s.seed, request_id=uuid.uuid4().hex, timeout=120))
        assert (got[0], got[1]) == (ids, text)
        assert got[2] == list(range(len(ids)))
        assert pb.FinishReason.Name(got[3]) == "FINISH_REASON_" + reason.upper()


def _explorer_children(pid: int) -> list[int]:
    """Explorer processes the worker spawned (multiprocessing spawn children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_dead_explorer_fails_the_stream_with_unavailable_and_the_worker_recovers(make_gateway, workers, rclient,
                                                                                  tiny_llama):
    import os
    import signal
    import time

    import grpc

    gw = make_gateway(model=str(tiny_llama), max_context=256)
    worker = workers.start(*ENGINE_FLAGS, "--executor", "distributed", "--threads", "1", engine="dex",
                           model=tiny_llama)
    workers.wait_ready(rclient, 1, timeout=180)
    deadline = time.monotonic() + 60
    while not (explorers := _explorer_children(worker.pid)):
        assert time.monotonic() < deadline, "the worker started no explorer process"
        time.sleep(0.2)
    stream = stream_generate(gw.address, "def long(x):", max_new_tokens=200, request_id=uuid.uuid4().hex,
                             timeout=120)
    with pytest.raises(grpc.RpcError) as err:
        for i, _chunk in enumerate(stream):
            if i == 2:
                os.kill(explorers[0], signal.SIGKILL)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "explorer" in err.value.details()
    assert worker.poll() is None                       # the worker lives on
    cfg = engine_mod.EngineConfig(explorers=2, width=2, max_batch=2, max_context=256)
    ids, text, _reason = run_direct(engine_mod.DexEngine.load(str(tiny_llama), cfg),
                                    GenerationRequest("d", "def add(a, b):", 12, SamplingParams()))
    got = collect(stream_generate(gw.address, "def add(a, b):", max_new_tokens=12, request_id=uuid.uuid4().hex,
                                  timeout=120))
    assert (got[0], got[1]) == (ids, text)             # fresh explorers serve the next request exactly


def _holders(client, names) -> dict[str, int]:
    """request id -> pid of the worker holding it (consumer name host-pid)."""
    from dexserve.queue.protocol import GROUP

    out = {}
    for row in client.xpending_range(names.requests, GROUP, "-", "+", 100):
        entry = client.xrange(names.requests, row["message_id"], row["message_id"])
        if entry:
            rid = pb.QueuedRequest.FromString(entry[0][1][b"m"]).request_id
            out[rid] = int(row["consumer"].decode().rsplit("-", 1)[1])
    return out


def test_kill9_with_the_shipped_model_restarts_reproduce_every_token(make_gateway, workers, rclient, names):
    """Exactly once with the real engine: two workers serve a greedy and a seeded sampled stream
    of the shipped model in one batch; the worker holding them is killed with -9 mid-stream. The
    survivor restarts them from position 0 and the gateway compares every repeated position with
    what it sent (a different token would end the call ABORTED): both streams complete OK and
    equal the engine's direct output token for token."""
    import os
    import signal
    import threading
    import time

    from dexserve.contract.model_card import shipped_model_dir

    from .helpers import token_events

    model = shipped_model_dir()
    flags = ["--explorers", "2", "--width", "2", "--max-batch", "2", "--max-context", "256", "--no-compile"]
    cfg = engine_mod.EngineConfig(explorers=2, width=2, max_batch=2, max_context=256)
    direct = engine_mod.DexEngine.load(str(model), cfg)
    cases = {"greedy": ("def fibonacci(n):", SamplingParams()),
             "sampled": ("import json\n", SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=2**63 + 12345))}
    n = 48
    want = {}
    for name, (prompt, s) in cases.items():
        req = GenerationRequest(name, prompt, n, s)
        ids, text, _ = run_direct(direct, req)
        want[name] = (ids, text)
        assert len(ids) >= 16, f"{name}: the direct run ends too early to kill a worker mid-stream"
    direct.close()
    gw = make_gateway(model=str(model), max_context=256)
    procs = {p.pid: p for p in (workers.start(*flags, engine="dex", model=model),
                                workers.start(*flags, engine="dex", model=model))}
    workers.wait_ready(rclient, 2, timeout=180)
    rids = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in cases}
    got: dict[str, object] = {}
    progress = {name: 0 for name in cases}

    def stream(name):
        prompt, s = cases[name]
        chunks = []
        try:
            for chunk in stream_generate(gw.address, prompt, max_new_tokens=n, temperature=s.temperature,
                                         top_k=s.top_k, top_p=s.top_p, seed=s.seed, request_id=rids[name],
                                         timeout=300):
                chunks.append(chunk)
                progress[name] += len(chunk.token_ids)
            got[name] = collect(chunks)
        except Exception as exc:
            got[name] = exc

    threads = [threading.Thread(target=stream, args=(name,)) for name in cases]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(progress.values()) < 6:
        assert time.monotonic() < deadline, f"no progress: {progress}\n{workers.logs()}"
        time.sleep(0.05)
    victim = _holders(rclient, names).get(rids["greedy"])
    assert victim in procs, "the greedy request is not held by a worker"
    os.kill(victim, signal.SIGKILL)
    procs[victim].wait()
    for t in threads:
        t.join(300)
    for name in cases:
        assert not isinstance(got[name], Exception), f"{name}: {got[name]}"
        ids, text, positions, reason = got[name]
        assert positions == list(range(len(want[name][0]))), f"{name}: a gap or a duplicate position"
        assert (ids, text) == want[name], f"{name}: the restarted attempt changed the answer"
    attempts = {e.attempt for e in token_events(rclient, names, rids["greedy"])}
    assert attempts == {1, 2}, f"the greedy request was not restarted: attempts {attempts}"
