"""The explorer step is capture-ready: static shapes, no graph break, and the
compiled step gives the eager step's outputs and buffer writes exactly."""

from __future__ import annotations

import pytest
import torch

from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.engine.step import ExplorerStep


def _state(step: ExplorerStep) -> list[torch.Tensor]:
    return [*step.k_bufs, *step.v_bufs, step.hidden]


def _restore(step: ExplorerStep, saved: list[torch.Tensor]) -> None:
    for dst, src in zip(_state(step), saved):
        dst.copy_(src)


@pytest.mark.parametrize("family", ["qwen3"])
def test_step_compiles_fullgraph_and_matches_eager(tiny_dirs, family):
    eng = DexEngine.load(str(tiny_dirs[family]), EngineConfig(explorers=2, width=4, max_context=64, max_batch=2,
                                                           prefill_chunk=8))
    eng.add(GenerationRequest("a", prompt_ids=(5, 6, 7, 8, 9), max_new_tokens=8, ignore_eos=True))
    eng.add(GenerationRequest("b", prompt_ids=(3, 2), max_new_tokens=8, ignore_eos=True,
                              sampling=SamplingParams(0.8, 10, 0.9, 3)))
    for _ in range(3):  # let the lattice grow some speculative nodes
        eng.step()
    plan = eng.lattice.plan()
    ex = eng.executor
    ex.apply_retire(plan, ex.steps)
    torch._dynamo.reset()
    for k, step in enumerate(ex.steps):
        inputs = ex.packer.lattice(plan.rows[k], 4).as_tuple()
        saved = [t.clone() for t in _state(step)]
        with torch.no_grad():
            eager_out = step(*inputs)
        eager_state = [t.clone() for t in _state(step)]
        _restore(step, saved)
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        with torch.no_grad():
            comp_out = compiled(*inputs)
        assert torch.equal(comp_out, eager_out)
        for a, b in zip(_state(step), eager_state):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_engine_is_lossless(tiny_dirs):
    """The engine with --compile commits the same tokens as eager."""
    path = str(tiny_dirs["llama"])
    outs = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        eng = DexEngine.load(path, EngineConfig(explorers=2, width=2, max_context=32, max_batch=1, prefill_chunk=4,
                                             compile=compile_))
        outs.append([ev.token_id for ev in eng.generate(GenerationRequest(
            "c", prompt_ids=(9, 8, 7), max_new_tokens=10, ignore_eos=True)) if hasattr(ev, "token_id")])
    assert outs[0] == outs[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_is_lossless(tiny_dirs):
    path = str(tiny_dirs["llama"])
    outs = []
    for graphs in (False, True):
        eng = DexEngine.load(path, EngineConfig(explorers=2, width=2, max_context=32, max_batch=1, device="cuda",
                                             cuda_graphs=graphs))
        outs.append([ev.token_id for ev in eng.generate(GenerationRequest(
            "g", prompt_ids=(9, 8, 7), max_new_tokens=10, ignore_eos=True)) if hasattr(ev, "token_id")])
    assert outs[0] == outs[1]
