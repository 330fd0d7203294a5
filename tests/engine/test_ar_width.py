"""Mode ar never spawns, so its steps are built one row per request, whatever
W is configured, and its tokens are unchanged."""

from __future__ import annotations

import os

import pytest

from engine.conftest import hf_greedy
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.executor import compile_cache_dir
from dexserve.contract.request import GenerationRequest

PROMPT = (5, 9, 3, 7, 2)
NEW = 10


def test_widths_for_ar_are_one_row_per_request():
    assert EngineConfig(explorers=4, width=8, mode="ar", max_batch=1).widths() == (1, 1, 1, 1)
    assert EngineConfig(explorers=2, width=(8, 2), mode="ar", max_batch=4).widths() == (4, 2)
    assert EngineConfig(explorers=2, width=8, mode="dex", max_batch=1).widths() == (8, 8)
    with pytest.raises(ValueError):
        EngineConfig(explorers=2, width=0, mode="ar").widths()


@pytest.mark.parametrize("W", [1, 8])
def test_ar_runs_at_width_one_and_equals_hf(tiny_dirs, W):
    path = str(tiny_dirs["qwen2"])
    eng = DexEngine.load(path, EngineConfig(explorers=2, width=W, mode="ar", max_context=48, max_batch=1, prefill_chunk=4))
    assert eng.executor.spec.widths == (1, 1)
    assert [r.width for r in eng.executor.runners] == [1, 1]
    got = [ev.token_id for ev in eng.generate(GenerationRequest("a", prompt_ids=PROMPT, max_new_tokens=NEW,
                                                                 ignore_eos=True)) if hasattr(ev, "token_id")]
    assert tuple(got) == hf_greedy(path, PROMPT, NEW)
    # the same prompt on a wide dex engine reconfigured to ar commits the same tokens
    wide = DexEngine.load(path, EngineConfig(explorers=2, width=W, mode="dex", max_context=48, max_batch=1, prefill_chunk=4))
    wide.reconfigure("ar", True)
    again = [ev.token_id for ev in wide.generate(GenerationRequest("b", prompt_ids=PROMPT, max_new_tokens=NEW,
                                                                   ignore_eos=True)) if hasattr(ev, "token_id")]
    assert again == got


def test_compile_cache_dir_defaults_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == os.path.join(str(tmp_path), "dexserve", "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert compile_cache_dir() == "/somewhere/else"
