"""Compiled one-row CPU lattice steps compute their weight projections as
`model.row_dots` (one dot product per output) instead of BLAS: the same values up
to float association, faster for one row. Every mode still equals `ar` and Hugging
Face `generate`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.conftest import hf_greedy
from engine.decoding import decode

from dexserve.contract.request import SamplingParams
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.model import row_dots


def test_row_dots_is_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    torch.testing.assert_close(row_dots(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(row_dots(x, w, None), F.linear(x, w))
    torch.testing.assert_close(row_dots(x[:1], w, b), F.linear(x[:1], w, b))


def _engine(path, mode: str, compile_: bool) -> DexEngine:
    return DexEngine.load(str(path), EngineConfig(explorers=2, width=4, mode=mode, max_context=64, max_batch=2,
                                                  prefill_chunk=4, compile=compile_))


def test_only_compiled_one_row_lattice_steps_use_row_dots(tiny_dirs):
    torch._dynamo.reset()
    eng = _engine(tiny_dirs["llama"], "dex", compile_=True)
    ex = eng.executor
    assert all(r.dots for r in ex.runners)
    assert not any(r.dots for r in ex.prefill_runners)   # prompt chunks: BLAS
    assert not any(r.dots for r in _engine(tiny_dirs["llama"], "dex", compile_=False).executor.runners)
    seen = []
    step = ex.steps[0]
    forward = step.forward

    def spy(*args, **kwargs):
        seen.append((args[0].shape[0], kwargs["dots"] if "dots" in kwargs else args[-1]))     # (rows, dots)
        return forward(*args, **kwargs)
    runner = ex.runners[0]
    runner.direct.clear()      # one row: a DirectGraph traces step.forward again (dots=True)
    step.forward = runner.fn = spy
    m, inputs = ex.rows[0]
    with torch.no_grad():
        for rows in (1, 3):
            runner(inputs, False, runner.buckets[0], rows)
    del step.forward
    assert seen == [(1, True), (3, False)]    # several rows: BLAS


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_modes_equal_ar_and_hugging_face(tiny_dirs, family):
    torch._dynamo.reset()
    prompts = [(5, 6, 7, 8, 9), (3, 1, 4, 1, 5, 9, 2, 6)]
    greedy, seeded = SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    eng = _engine(tiny_dirs[family], "ar", compile_=True)   # one compiled executor; the modes take turns on it
    try:
        outs = {}
        for mode in ("ar", "dex", "select:1"):
            eng.reconfigure(mode, True)
            outs[mode] = decode(eng, prompts, greedy, new=16)
        for mode in ("dex", "ar"):
            eng.reconfigure(mode, True)
            outs[f"{mode}-seeded"] = decode(eng, prompts, seeded)
    finally:
        eng.close()
    reference = [list(hf_greedy(str(tiny_dirs[family]), p, 16)) for p in prompts]
    assert outs["ar"] == reference
    assert outs["dex"] == reference and outs["select:1"] == reference
    assert outs["dex-seeded"] == outs["ar-seeded"]


def test_matmul_floor_times_blas_and_row_dots(tiny_dirs):
    """`dex bench --hf` sets the weight matmuls alone beside the engine, both ways."""
    from dexserve.contract.model_card import ModelCard
    from dexserve.engine.measure import matmul_floor

    torch._dynamo.reset()
    floor = matmul_floor(ModelCard.load(str(tiny_dirs["llama"])), repeats=3)
    assert floor["blas_tokens_per_s"] > 0 and floor["row_dots_tokens_per_s"] > 0
    assert floor["tokens_per_s"] == max(floor["blas_tokens_per_s"], floor["row_dots_tokens_per_s"])
    assert floor["weight_mib_per_token"] > 0
