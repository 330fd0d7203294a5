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
