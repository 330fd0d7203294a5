"""Compiled one-row host steps run as `DirectGraph`s (traced once, compiled by
inductor, called without dynamo): the same candidates, the same K/V and hidden
writes, bit for bit, as the same variant through `torch.compile`."""

from __future__ import annotations

import pytest
import torch

from dexserve.engine.config import EngineConfig
from dexserve.engine.direct import DirectGraph, tensor_leaves
from dexserve.engine.engine import DexEngine
from dexserve.engine.executor import RowPacker


@pytest.fixture(scope="module")
def ex(tiny_dirs):
    """One compiled executor for the module (one span bucket: compiling is the slow part)."""
    torch._dynamo.reset()
    ex = DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, width=2, mode="dex", max_context=32,
                                                              max_batch=2, compile=True)).executor
    yield ex
    ex.close()


def _inputs(step, seed: int):
    """One real-looking row: a position with a few committed keys and its own lattice row."""
    pad = RowPacker.padding(step.spec, 1)
    g = torch.Generator().manual_seed(seed)
    pad.token.fill_(int(torch.randint(0, 50, (1,), generator=g)))
    pad.position.fill_(5)
    pad.slot.fill_(1)
    pad.request.fill_(0)
    pad.kv_row.fill_(step.spec.lattice_kv_row(1))
    pad.lo.fill_(0)
    pad.hi.fill_(5)
    pad.anc.fill_(step.spec.lattice_kv_row(1))
    return pad.as_tuple()


def _graph(runner, args, sampled: bool, span: int, logprobs: bool) -> DirectGraph:
    """The runner's graph for a variant, built as a round would build it on first use."""
    key = (sampled, span, logprobs)
    if key not in runner.direct:
        runner.direct[key] = DirectGraph(runner.step, args, sampled=sampled, span=span, logprobs=logprobs,
                                         prefill=False, dots=True)
    return runner.direct[key]


@pytest.mark.parametrize("sampled,logprobs", [(False, False), (True, False), (False, True)])
def test_direct_graph_equals_torch_compile_bit_for_bit(ex, sampled, logprobs):
    """(The compiled modes against Hugging Face, through these graphs, on llama and qwen3:
    tests/engine/test_row_dots.py.)"""
    for k, (step, runner) in enumerate(zip(ex.steps, ex.runners)):
        g = torch.Generator().manual_seed(k)
        step.kv.copy_(torch.randn(step.kv.shape, generator=g))
        step.hidden.copy_(torch.randn(step.hidden.shape, generator=g))
        step.set_sampling(0, 0.8, 5, 0.9, 123)
        args = _inputs(step, k)
        span = runner.buckets[0]
        kv0, h0 = step.kv.clone(), step.hidden.clone()
        direct = _graph(runner, args, sampled, span, logprobs)
        out_direct = direct(*args)
        kv1, h1 = step.kv.clone(), step.hidden.clone()
        step.kv.copy_(kv0)
        step.hidden.copy_(h0)
        with torch.no_grad():
            out_dynamo = runner.fn(*args, sampled, span, logprobs, False, True)
        assert torch.equal(out_direct, out_dynamo)
        assert torch.equal(kv1, step.kv) and torch.equal(h1, step.hidden)
        assert not torch.equal(kv0, kv1), "the step wrote its K/V rows in place"


def test_direct_graph_reads_live_tensors(ex):
    """Sampling tables written after the trace are what the graph reads (inputs, not constants)."""
    step, runner = ex.steps[1], ex.runners[1]
    args = _inputs(step, 0)
    step.hidden.copy_(torch.randn(step.hidden.shape, generator=torch.Generator().manual_seed(1)))
    direct = _graph(runner, args, True, runner.buckets[0], False)
    assert {name for _, name in tensor_leaves(step)} >= {"kv", "hidden", "temperature", "seed", "lm_head"}
    seen = set()
    for seed in range(8):
        step.set_sampling(0, 1.5, 0, 1.0, seed)
        seen.add(int(direct(*args)[0, 0]))
    assert len(seen) > 1, "a new seed changes the sampled candidate"


def test_compiled_one_row_steps_take_the_direct_path(ex):
    runner = ex.runners[0]
    assert set(runner.direct) >= {(False, span, False) for span in runner.buckets}, \
        "warm-up builds the greedy one-row variants (others on first use)"
    calls = []
    fn = runner.fn
    runner.fn = lambda *a: calls.append(a[0].shape[0]) or fn(*a)
    m, inputs = ex.rows[0]
    try:
        with torch.no_grad():
            runner(inputs, False, runner.buckets[0], 1)
            runner(inputs, False, runner.buckets[0], 2)
    finally:
        runner.fn = fn
    assert calls == [2], "one row: the direct graph; two rows: torch.compile"
