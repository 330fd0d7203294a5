"""Compiled CPU lattice steps compute their weight projections as `model.row_dots`
(one dot product per output) instead of BLAS: the same values up to float
association, faster for a few rows, and batch-invariant (a row's projections do
not depend on the rows beside it). Every mode still equals `ar` and Hugging Face
`generate`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.conftest import hf_greedy
from engine.decoding import decode

from dexserve.contract.request import SamplingParams
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.executor import ROW_DOTS_MAX_ROWS, StepRunner
from dexserve.engine.model import row_dots


def test_row_dots_is_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    torch.testing.assert_close(row_dots(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(row_dots(x, w, None), F.linear(x, w))
    torch.testing.assert_close(row_dots(x[:1], w, b), F.linear(x[:1], w, b))   # the one-row form


def test_compiled_row_dots_are_batch_invariant():
    """The compiled kernels sum each output in the same order at any row count:
    a row alone (static one-row graph, one form) and among others (dynamic graph,
    the rows-inside-each-weight-row form) agree bit for bit."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(704, 256, generator=g) / 16
    x = torch.randn(6, 256, generator=g)
    fn = torch.compile(row_dots, fullgraph=True, dynamic=False)
    with torch.no_grad():
        alone = fn(x[:1].clone(), w, None)
        many = x[:5].clone()
        torch._dynamo.mark_dynamic(many, 0, min=2, max=8)
        together = fn(many, w, None)
    assert together.shape == (5, 704)
    assert torch.equal(alone[0], together[0])
    torch.testing.assert_close(together, F.linear(many, w))


def _engine(path, mode: str, compile_: bool) -> DexEngine:
    return DexEngine.load(str(path), EngineConfig(explorers=2, width=4, mode=mode, max_context=64, max_batch=2,
                                                  prefill_chunk=4, compile=compile_))


def test_runners_choose_row_dots_only_for_compiled_narrow_lattice_steps(tiny_dirs):
    torch._dynamo.reset()
    eng = _engine(tiny_dirs["llama"], "dex", compile_=True)
    assert all(r.dots for r in eng.executor.runners)
    assert not any(r.dots for r in eng.executor.prefill_runners)   # prompt chunks: BLAS
    step = eng.executor.steps[0]
    wide = DexEngine.executor_spec(eng.card, EngineConfig(explorers=2, width=ROW_DOTS_MAX_ROWS + 1, max_context=64,
                                                          max_batch=2, compile=True))
    assert not StepRunner(step, ROW_DOTS_MAX_ROWS + 1, wide).dots  # wide steps: BLAS
    assert not any(r.dots for r in _engine(tiny_dirs["llama"], "dex", compile_=False).executor.runners)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_modes_equal_ar_and_hugging_face(tiny_dirs, family):
    torch._dynamo.reset()
    prompts = [(5, 6, 7, 8, 9), (3, 1, 4, 1, 5, 9, 2, 6)]
    greedy = SamplingParams()
    outs = {mode: decode(_engine(tiny_dirs[family], mode, compile_=True), prompts, greedy, new=16)
            for mode in ("ar", "dex", "select:1")}
    reference = [list(hf_greedy(str(tiny_dirs[family]), p, 16)) for p in prompts]
    assert outs["ar"] == reference
    assert outs["dex"] == reference and outs["select:1"] == reference
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    assert decode(_engine(tiny_dirs[family], "dex", compile_=True), prompts, seeded) == \
        decode(_engine(tiny_dirs[family], "ar", compile_=True), prompts, seeded)


def test_matmul_floor_times_blas_and_row_dots(tiny_dirs):
    """`dex bench --hf` sets the weight matmuls alone beside the engine, both ways."""
    from dexserve.contract.model_card import ModelCard
    from dexserve.engine.measure import matmul_floor

    torch._dynamo.reset()
    floor = matmul_floor(ModelCard.load(str(tiny_dirs["llama"])), repeats=3)
    assert floor["blas_tokens_per_s"] > 0 and floor["row_dots_tokens_per_s"] > 0
    assert floor["tokens_per_s"] == max(floor["blas_tokens_per_s"], floor["row_dots_tokens_per_s"])
    assert floor["weight_mib_per_token"] > 0
