"""The service streams exactly what the real DEX engine outputs directly
(greedy and seeded sampling), with a tiny random Llama and a real worker."""

from __future__ import annotations

from pathlib import Path

import uuid

import pytest

from dexserve.client import stream_generate
from dexserve.engine.request import GenerationRequest, SamplingParams
from dexserve.v1 import dex_pb2 as pb

from .helpers import collect, run_direct

engine_mod = pytest.importorskip("dexserve.engine.engine", reason="the DEX engine is not in this tree yet")

pytestmark = pytest.mark.slow
ENGINE_FLAGS = ["--explorers", "2", "--width", "2", "--max-batch", "2", "--max-context", "256"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with the shipped tokenizer and no EOS (every request runs to max_new_tokens)."""
    pytest.importorskip("torch")
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", eos=False)


def test_streams_equal_direct_engine_output(make_gateway, workers, rclient, tiny_llama):
    cfg = engine_mod.EngineConfig(explorers=2, width=2, max_batch=2, max_context=256)
    engine = engine_mod.Engine.load(str(tiny_llama), cfg)
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
