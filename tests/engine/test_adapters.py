"""Per-boundary adapters (DEX.md, "Standard models") change only which tokens
are proposed early, never what is committed."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.conftest import hf_greedy
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.engine.model import ADAPTER_FILE
from dexserve.contract.model_card import ModelLoadError
from dexserve.contract.request import GenerationRequest


def decode(path, mode: str) -> tuple[list[int], list[int]]:
    eng = DexEngine.load(str(path), EngineConfig(explorers=4, width=8, mode=mode, max_context=64, max_batch=1))
    tokens, readouts = [], []
    eng.add(GenerationRequest("a", prompt_ids=(7, 8, 9), max_new_tokens=12, ignore_eos=True))
    while eng.active:
        res = eng.step()
        tokens += [ev.token_id for ev in res.tokens]
        readouts += [row.readout for rows in res.record.explorers[:-1] for row in rows]
    return tokens, readouts


def test_adapters_change_proposals_not_output(tiny_dirs, tmp_path):
    base = tiny_dirs["llama"]
    adapted = tmp_path / "adapted"
    shutil.copytree(base, adapted)
    torch.manual_seed(0)
    hidden = 64
    save_file({f"boundary.{d}.weight": torch.randn(hidden, hidden) * 0.5 for d in (1, 2, 3)}
              | {"boundary.2.bias": torch.randn(hidden)}, adapted / ADAPTER_FILE)
    ref = list(hf_greedy(str(base), (7, 8, 9), 12))
    plain_tokens, plain_readouts = decode(base, "ar")
    adapted_tokens, adapted_readouts = decode(adapted, "ar")
    assert plain_tokens == adapted_tokens == ref            # the final depth is untouched
    assert plain_readouts != adapted_readouts               # the early readouts went through the adapters
    assert decode(adapted, "dex")[0] == ref                 # and DEX over adapted readouts stays lossless


@pytest.mark.parametrize("tensors,error", [
    ({"boundary.1.weight": torch.zeros(3, 3)}, "boundary.1.weight"),   # wrong shape, named
    # at the final depth an adapter would change the committed token: lossless forbids it
    ({"boundary.4.weight": torch.zeros(64, 64)}, "depths 1..3"),
])
def test_bad_adapter_file_is_refused(tiny_dirs, tmp_path, tensors, error):
    adapted = tmp_path / "bad"
    shutil.copytree(tiny_dirs["llama"], adapted)
    save_file(tensors, adapted / ADAPTER_FILE)
    with pytest.raises(ModelLoadError, match=error):
        DexEngine.load(str(adapted))
