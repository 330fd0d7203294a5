"""Both engines satisfy the `Engine` protocol the worker loop and telemetry use,
and both take the finish decision from the one function that defines it."""

from __future__ import annotations

import typing

import pytest

from dexserve.contract.engine import Engine, EngineInfo
from dexserve.contract.limits import Limits
from dexserve.contract.request import FinishReason, Finished, GenerationRequest, finish_reason
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.worker.loop import Worker
from dexserve.worker.standin import InstantEngine, write_standin_model


@pytest.fixture(scope="module")
def engines(tiny_dirs, tmp_path_factory):
    dex = DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=2, max_context=64, max_batch=2))
    standin = InstantEngine.load(str(write_standin_model(tmp_path_factory.mktemp("m") / "standin")),
                                 Limits(max_context=64))
    yield {"dex": dex, "standin": standin}
    dex.close()


@pytest.mark.parametrize("kind", ["dex", "standin"])
def test_engines_satisfy_the_protocol(engines, kind):
    eng = engines[kind]
    assert isinstance(eng, Engine)
    info = eng.info
    assert isinstance(info, EngineInfo) and info.engine == kind and info.model == eng.card.name
    if kind == "dex":
        assert info.explorers == 2 and info.mode == "dex" and info.lattice_slots > 0


def test_worker_loop_is_typed_against_the_protocol():
    assert typing.get_type_hints(Worker.__init__)["engine"] is Engine


@pytest.mark.parametrize("kind", ["dex", "standin"])
def test_both_engines_finish_by_context_and_length_the_same_way(engines, kind):
    """A request that would overrun the context ends with CONTEXT at exactly
    max_context positions; one that fits ends with LENGTH."""
    eng = engines[kind]
    prompt_ids = tuple(range(5, 5 + 60))          # 60 prompt tokens, context 64
    for new, want, produced in ((40, FinishReason.CONTEXT, 4), (3, FinishReason.LENGTH, 3)):
        eng.add(GenerationRequest(f"{kind}-{new}", prompt=str(prompt_ids), prompt_ids=prompt_ids,
                                  max_new_tokens=new, ignore_eos=True))
        fin = None
        while fin is None:
            res = eng.step()
            fin = next((f for f in res.finished if isinstance(f, Finished)), None)
        assert (fin.reason, fin.completion_tokens) == (want, produced)


@pytest.mark.parametrize("kw, want", [
    (dict(stopped=True, eos=True, generated=9, max_new_tokens=9, prompt_tokens=1, max_context=10), FinishReason.STOP),
    (dict(stopped=False, eos=True, generated=9, max_new_tokens=9, prompt_tokens=1, max_context=10), FinishReason.EOS),
    (dict(stopped=False, eos=False, generated=9, max_new_tokens=9, prompt_tokens=1, max_context=10),
     FinishReason.LENGTH),
    (dict(stopped=False, eos=False, generated=4, max_new_tokens=9, prompt_tokens=6, max_context=10),
     FinishReason.CONTEXT),
    (dict(stopped=False, eos=False, generated=3, max_new_tokens=9, prompt_tokens=6, max_context=10), None),
])
def test_finish_decision_precedence(kw, want):
    assert finish_reason(**kw) is want
