"""Half precision: every mode commits exactly what `ar` commits in the same
dtype (greedy and seeded sampling, batch mixes), on every tiny model family;
`--dtype auto` is the checkpoint's dtype on CUDA and float32 on CPU."""

from __future__ import annotations

import pytest
import torch

from engine.conftest import FAMILIES
from engine.decoding import decode
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.request import SamplingParams

PROMPTS = [(5, 77, 300, 12, 900, 41), (1,), tuple(range(1, 30))]
NEW = 10


def decode_in(eng: DexEngine, mode: str, sampling: SamplingParams) -> list[list[int]]:
    eng.reconfigure(mode, True)
    return decode(eng, PROMPTS, sampling, NEW)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_mode_equals_ar_in_half_precision(tiny_dirs, family, dtype):
    eng = DexEngine.load(str(tiny_dirs[family]), EngineConfig(explorers=3, width=4, max_context=64, max_batch=3,
                                                              prefill_chunk=8, dtype=dtype))
    assert eng.executor.spec.dtype == getattr(torch, dtype)
    assert eng.executor.steps[0].kv.dtype == getattr(torch, dtype)
    for sampling in (SamplingParams(), SamplingParams(0.8, 20, 0.9, 11)):
        ref = decode_in(eng, "ar", sampling)
        for mode in ("dex", "select:1", "select:2"):
            assert decode_in(eng, mode, sampling) == ref, (family, dtype, mode, sampling)


def test_auto_dtype():
    assert EngineConfig().resolved_dtype("bfloat16") == "float32"           # CPU: float32
    assert EngineConfig(device="cuda").resolved_dtype("bfloat16") == "bfloat16"
    assert EngineConfig(device="cuda:1").resolved_dtype("float16") == "float16"
    assert EngineConfig(device="cuda").resolved_dtype(None) == "float32"     # no dtype in config.json
    assert EngineConfig(device="cuda").resolved_dtype("int8") == "float32"
    assert EngineConfig(dtype="float16").resolved_dtype("float32") == "float16"
    with pytest.raises(ValueError, match="dtype 'half'"):
        EngineConfig(dtype="half").resolved_dtype(None)
