"""A round runs only the rows it has, not the explorer's width W: on the host
exactly that many (a compiled step has one graph for one row and one dynamic
graph for 2..W), as CUDA graphs the narrowest captured bucket. The candidates of
the real rows are the ones the full-width step gives them."""

from __future__ import annotations

import pytest
import torch

from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.executor import StepRunner, row_buckets
from dexserve.contract.request import GenerationRequest


def test_row_buckets():
    assert row_buckets(1) == (1,)
    assert row_buckets(8) == (1, 2, 4, 8)
    assert row_buckets(6) == (1, 2, 4, 6)


def _engine(tiny_dirs, compile_: bool) -> DexEngine:
    return DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=6, max_context=48, max_batch=2,
                                                               prefill_chunk=4, compile=compile_))


@pytest.mark.parametrize("compile_", [False, True])
def test_narrow_rounds_give_the_full_width_candidates(tiny_dirs, compile_):
    torch._dynamo.reset()
    eng = _engine(tiny_dirs, compile_)
    eng.add(GenerationRequest("a", prompt_ids=(5, 6, 7, 8, 9), max_new_tokens=12, ignore_eos=True))
    for _ in range(3):  # some speculative nodes
        eng.step()
    plan = eng.lattice.plan()
    ex = eng.executor
    ex.apply_retire(plan, ex.steps)
    k = max(range(len(plan.rows)), key=lambda i: len(plan.rows[i]))
    rows = plan.rows[k]
    assert 1 <= len(rows) < 6
    runner: StepRunner = ex.runners[k]
    assert runner.rows_for(len(rows)) == len(rows)
    m, inputs = ex.rows[k]
    ex.packer.fill(m, rows, 6)
    span = runner.span(int((m[:, 6] - m[:, 5]).max()))
    with torch.no_grad():
        full = runner(inputs, False, span).clone()
        narrow = runner(inputs, False, span, len(rows))
    assert narrow.shape[0] == len(rows)
    assert torch.equal(narrow, full[:len(rows)])


def test_narrow_and_full_width_engines_commit_the_same_tokens(tiny_dirs):
    outs = []
    for narrow in (False, True):
        cfg = EngineConfig(explorers=2, width=6, max_context=48, max_batch=2, prefill_chunk=4)
        eng = DexEngine.load(str(tiny_dirs["qwen3"]), cfg)
        for r in eng.executor.runners:
            r.narrow = narrow
        outs.append([ev.token_id for ev in eng.generate(GenerationRequest("a", prompt_ids=(3, 1, 4, 1, 5),
                                                                          max_new_tokens=16, ignore_eos=True))
                     if hasattr(ev, "token_id")])
    assert outs[0] == outs[1]


def test_prefill_runners_run_their_full_chunk(tiny_dirs):
    eng = _engine(tiny_dirs, False)
    assert all(not r.narrow and r.widths == (4,) for r in eng.executor.prefill_runners)
    assert all(r.narrow and r.widths == (1, 2, 6) for r in eng.executor.runners)
