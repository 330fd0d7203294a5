"""Attention reads only each row's own context span: any span bucket that holds
a round's rows gives the full-span step's results, and the bucket is chosen
from the rows, never too short."""

from __future__ import annotations

import pytest
import torch

from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.engine.step import span_buckets, span_for


def test_buckets_are_powers_of_two_capped_by_the_limit():
    assert span_buckets(512) == (32, 64, 128, 256, 512)
    assert span_buckets(96) == (32, 64, 96)
    assert span_buckets(20) == (20,)
    assert span_for(0, (32, 64)) == 32
    assert span_for(33, (32, 64)) == 64
    with pytest.raises(ValueError, match="more than the largest span 64"):
        span_for(65, (32, 64))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_bucket_that_holds_the_rows_matches_the_full_span(tiny_dirs, family):
    eng = DexEngine.load(str(tiny_dirs[family]), EngineConfig(explorers=2, width=4, max_context=256, max_batch=2,
                                                           prefill_chunk=16))
    # two requests with different context lengths share each explorer's step
    eng.add(GenerationRequest("long", prompt_ids=tuple(range(3, 73)), max_new_tokens=20, ignore_eos=True))
    eng.add(GenerationRequest("short", prompt_ids=(9, 8, 7), max_new_tokens=20, ignore_eos=True,
                              sampling=SamplingParams(0.8, 20, 0.9, 5)))
    for _ in range(4):
        eng.step()
    plan = eng.lattice.plan()
    ex = eng.executor
    ex.apply_retire(plan, ex.steps)
    checked = 0
    for k, step in enumerate(ex.steps):
        x = ex.packer.lattice(plan.rows[k], 4)
        need = int((x.hi - x.lo).max())
        state = [*step.k_bufs, *step.v_bufs, step.hidden]
        saved = [t.clone() for t in state]
        results = {}
        for span in span_buckets(256):
            if span < need:
                continue
            with torch.no_grad():
                cand = step(*x.as_tuple(), sampled=True, span=span).clone()
            results[span] = (cand, step.hidden.clone())
            for dst, src in zip(state, saved):
                dst.copy_(src)
        full_cand, full_hidden = results[256]
        for span, (cand, hidden) in results.items():
            assert torch.equal(cand[: len(plan.rows[k])], full_cand[: len(plan.rows[k])]), (k, span)
            torch.testing.assert_close(hidden, full_hidden, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 4  # several buckets compared on rows that see real context


@pytest.mark.parametrize("family", ["llama", "mistral"])   # mistral: a sliding window moves each row's lo
def test_a_prompt_chunk_attends_over_one_shared_slice_as_each_row_alone(tiny_dirs, family):
    """A prefill chunk gathers its request's keys once (`prefill_keys`), not once per
    row; every row sees what the per-row gather shows it, padding rows stay finite."""
    from dexserve.engine.executor import prefill_need

    eng = DexEngine.load(str(tiny_dirs[family]), EngineConfig(explorers=2, width=4, max_context=256, max_batch=2,
                                                           prefill_chunk=16))
    ex = eng.executor
    ex.prefill(1, list(range(3, 43)))                 # 40 positions of request row 1 already in
    step = ex.steps[0]
    m, inputs = ex.prefill_rows
    ex.packer.fill_prefill(m, 1, list(range(50, 61)), 40)   # 11 more: 5 padding rows in the chunk of 16
    span = ex.prefill_runners[0].span(prefill_need(m))
    assert span >= 51 - int(m[0, 5])
    state = [*step.k_bufs, *step.v_bufs, step.hidden]
    saved = [t.clone() for t in state]
    out = {}
    for shared in (False, True):
        with torch.no_grad():
            # the per-row gather needs each row's own span; the shared slice starts at row 0's lo
            cand = step(*inputs.as_tuple(), sampled=False, span=256, prefill=shared).clone()
        out[shared] = (cand, step.hidden.clone(), [t.clone() for t in state[:-1]])
        for dst, src in zip(state, saved):
            dst.copy_(src)
    real = 11
    assert torch.equal(out[True][0][:real], out[False][0][:real])
    slots = torch.from_numpy(m[:real, 2])
    torch.testing.assert_close(out[True][1][slots], out[False][1][slots], rtol=1e-5, atol=1e-5)
    scratch = eng.executor.spec.buffers.kv_scratch       # what padding rows write differs (they see other keys)
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a[:scratch], b[:scratch], rtol=1e-5, atol=1e-5)   # the K/V of every real row
    assert torch.isfinite(out[True][1]).all() and all(torch.isfinite(t).all() for t in out[True][2])
