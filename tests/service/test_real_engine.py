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
