"""Retiring a committed node moves its K/V rows, for every layer of the explorer,
from its lattice row to its request's context row. On the host that is a numpy
gather and scatter over the step's own memory; it must move exactly what the
torch index ops (the device path) move, bit for bit, in every dtype."""

from __future__ import annotations

import pytest
import torch

from dexserve.contract.model_card import ModelCard
from dexserve.engine.model import load_weights, rotary_tables
from dexserve.engine.step import BufferSpec, ExplorerStep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_retire_equals_torch_index_ops(tiny_dirs, dtype):
    card = ModelCard.load(str(tiny_dirs["llama"]))
    spec = BufferSpec(max_batch=3, max_context=16, lattice_slots=6, prefill_rows=4, ancestors=2)
    layers = range(1, 3)
    w = load_weights(card, layers, need_embed=False, dtype=dtype, device="cpu")
    cos, sin = rotary_tables(card, spec.max_context, dtype=dtype, device="cpu")
    step = ExplorerStep(w, layers, spec, cos, sin, candidates=1, first=False, dtype=dtype)
    assert step.host_kv is not None and step.host_kv.base is not None   # a view of step.kv, not a copy
    step.kv.copy_(torch.randn(step.kv.shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    src = torch.tensor([spec.lattice_kv_row(s) for s in (0, 3, 5)])
    dst = torch.tensor([0 * 16 + 7, 1 * 16 + 2, 2 * 16 + 15])
    before = step.kv.clone()

    expected = before.clone()
    off = step.buffer_offsets
    expected.index_copy_(0, (off + dst[None, :]).reshape(-1), expected.index_select(0, (off + src[None, :]).reshape(-1)))
    step.retire(src, dst)
    assert torch.equal(step.kv.view(torch.uint8), expected.view(torch.uint8))
    assert not torch.equal(step.kv, before)   # rows really moved (the random rows differ)

    step.kv.copy_(before)
    step.retire(src.numpy(), dst.numpy())     # the payload's numpy views, as the explorers pass them
    assert torch.equal(step.kv.view(torch.uint8), expected.view(torch.uint8))

    host = step.host_kv
    step.host_kv = None                       # the device path, on the same rows
    step.kv.copy_(before)
    step.retire(src, dst)
    step.host_kv = host
    assert torch.equal(step.kv.view(torch.uint8), expected.view(torch.uint8))
