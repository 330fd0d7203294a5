"""Auto sizing: an engine left to choose takes as many full-context requests as
the KV budget holds (capped per device type), the model's context, and a
width that lets every request move each round; a budget that cannot hold one
request is an error naming the flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from dexserve.contract.model_card import ModelCard
from dexserve.engine.config import AUTO_BATCH_CAP, AUTO_WIDTH, EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.memory import GIB, free_memory, kv_budget, kv_bytes_per_position
from dexserve.engine.model import ModelDims


def _dims(path) -> ModelDims:
    return ModelDims.from_config(ModelCard.load(path).config)


def test_kv_bytes_per_position_counts_keys_and_values_of_every_layer(tiny_dirs):
    d = _dims(tiny_dirs["llama"])
    assert kv_bytes_per_position(d, torch.float32) == 2 * d.layers * d.kv_heads * d.head_dim * 4
    assert kv_bytes_per_position(d, torch.bfloat16) == 2 * d.layers * d.kv_heads * d.head_dim * 2


def test_an_explicit_budget_sizes_the_batch(tiny_dirs):
    d = _dims(tiny_dirs["llama"])
    per_pos = kv_bytes_per_position(d, torch.float32)
    gib = (3 * 64 * per_pos + 10 * per_pos) / GIB          # three 64-position requests and the slots
    b = kv_budget(d, torch.float32, "cpu", 64, weights=0, kv_memory_gib=gib, slots=10)
    assert (b.max_batch, b.batch) == (3, 3)
    big = kv_budget(d, torch.float32, "cpu", 64, weights=0, kv_memory_gib=1.0, slots=10)
    assert big.max_batch > AUTO_BATCH_CAP["cpu"] and big.batch == AUTO_BATCH_CAP["cpu"]
    with pytest.raises(ValueError, match="kv_memory"):
        kv_budget(d, torch.float32, "cpu", 64, weights=0, kv_memory_gib=0.0, slots=10)


def test_auto_engine_sizes(tiny_dirs):
    eng = DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, max_context=64))
    try:
        # tiny model, plenty of memory: the CPU cap; the width follows
        assert eng.config.max_batch == AUTO_BATCH_CAP["cpu"] == eng.executor.spec.buffers.max_batch
        assert eng.executor.spec.widths == (max(AUTO_WIDTH, AUTO_BATCH_CAP["cpu"]),) * 2
        assert len(eng._free_rows) == AUTO_BATCH_CAP["cpu"]
    finally:
        eng.close()
    wide = EngineConfig(explorers=2, max_batch=12)
    assert wide.widths() == (12, 12), "an auto width lets every request of a larger batch move each round"
    assert EngineConfig(explorers=2, max_batch=2).widths() == (AUTO_WIDTH,) * 2


def test_a_budget_too_small_for_one_request_names_the_flags(tiny_dirs):
    with pytest.raises(ValueError, match="--max-context.*--kv-memory"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, max_context=64, kv_memory_gib=1e-9))


def test_the_default_context_is_the_models(tiny_dirs):
    from dexserve.launch.engine_options import add_engine_arguments, engine_config

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    cfg = engine_config(p.parse_args(["--model", str(tiny_dirs["qwen2"])]))
    assert cfg.max_context == ModelCard.load(tiny_dirs["qwen2"]).max_position_embeddings
    assert (cfg.max_batch, cfg.width) == (0, 0)     # sized when the engine loads
    cfg = engine_config(p.parse_args(["--model", str(tiny_dirs["qwen2"]), "--max-context", "48",
                                      "--kv-memory", "0.5"]))
    assert (cfg.max_context, cfg.kv_memory_gib) == (48, 0.5)


def test_auto_sizing_on_a_missing_gpu_says_so(tiny_dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        DexEngine.load(str(tiny_dirs["llama"]), EngineConfig(explorers=2, max_context=64, device="cuda"))


def test_host_memory_without_proc_or_under_a_cgroup_limit(monkeypatch):
    from dexserve.engine import memory

    files = {"/proc/meminfo": None, "/sys/fs/cgroup/memory.max": "1073741824\n",
             "/sys/fs/cgroup/memory.current": "536870912\n"}
    monkeypatch.setattr(memory, "_read", lambda path: files.get(path))
    avail, where = memory.host_available()            # the container leaves 0.5 GiB
    assert (avail, where) == (512 << 20, "the cgroup memory limit")
    files["/sys/fs/cgroup/memory.max"] = "max\n"        # no limit: what the C library reports
    avail, where = memory.host_available()
    assert avail > 0 and where == "available pages"


@pytest.mark.parametrize("device,index", [("cuda", 3), ("cuda:1", 1)])
def test_cuda_free_memory_asks_by_device_index(monkeypatch, device, index):
    """torch < 2.5's mem_get_info rejects torch.device("cuda") (no index): the
    budget asks by index, the current device's when none is given."""
    asked = []

    def mem_get_info(dev):
        if not isinstance(dev, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        asked.append(dev)
        return 7 << 30, 8 << 30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert free_memory(device)[0] == 7 << 30 and asked == [index]
