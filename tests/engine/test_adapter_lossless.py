"""Lossless with trained adapters: adapters of both shapes (full affine and low
rank), trained by `dex train-adapter` on every tiny model family, change only
what the boundaries propose. Every mode (ar, select:J, dex with and without
DECS) commits exactly what `ar` without adapters commits, greedy (equal to
Hugging Face generate) and with seeded sampling."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.conftest import FAMILIES, hf_greedy
from engine.test_lossless import run
from dexserve.contract.request import SamplingParams
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.training.adapters import AdapterTrainingSettings, train
from dexserve.training.corpus import stdlib_root

SHAPES = {"full": None, "rank4": 4}
NEW = 10


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory) -> dict[tuple[str, str], str]:
    """(family, shape) -> adapter file, trained for the depths of every K in 2..4 (1, 2, 3) on a 4-layer model.
    A few steps at a high rate, so the adapters move the readouts far from the shared head's."""
    root = tmp_path_factory.mktemp("adapters")
    data = root / "code.txt"
    data.write_text((stdlib_root() / "json" / "decoder.py").read_text()[:12000])
    out = {}
    for family in FAMILIES:
        for shape, rank in SHAPES.items():
            f = root / f"{family}-{shape}.safetensors"
            train(AdapterTrainingSettings(model=str(tiny_dirs[family]), data=(str(data),), explorers=4, rank=rank,
                                          steps=8, out=str(f), batch=4, seq=32, lr=5e-2, warmup=1, heldout_every=10,
                                          heldout_sequences=2, shuffle_buffer=8, progress=False, threads=1))
            out[family, shape] = str(f)
    return out


@functools.lru_cache(maxsize=64)
def engine(path: str, adapters: str, K: int, W: int) -> DexEngine:
    return DexEngine.load(path, EngineConfig(explorers=K, width=W, max_context=96, max_batch=2, prefill_chunk=8,
                                             adapters=adapters))


def all_modes(K: int) -> list[tuple[str, bool]]:
    return [("ar", True), ("dex", True), ("dex", False)] + [(f"select:{j}", True) for j in range(1, K)]


prompt_ids = st.lists(st.integers(1, 2047), min_size=1, max_size=16).map(tuple)


def readouts_differ(path: str, adapters: str, prompt: tuple[int, ...]) -> bool:
    """Do the adapters change any boundary readout on this prompt? (they must, or the test proves nothing)"""
    seen = []
    for ad in ("none", adapters):
        eng = engine(path, ad, 4, 8)
        eng.reconfigure("ar", True)
        from dexserve.contract.request import GenerationRequest

        eng.add(GenerationRequest("r", prompt_ids=prompt, max_new_tokens=NEW, ignore_eos=True))
        rows = []
        while eng.active:
            res = eng.step()
            rows += [(row.position, row.readout) for ex in res.record.explorers[:-1] for row in ex]
        seen.append(rows)
    return seen[0] != seen[1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(prompt_ids, min_size=1, max_size=2), K=st.sampled_from([2, 3, 4]),
       W=st.sampled_from([1, 2, 8]), seed=st.integers(0, 2**31 - 1))
def test_trained_adapters_keep_every_mode_identical_to_ar(trained, tiny_dirs, family, shape, prompts, K, W, seed):
    path, adapters = str(tiny_dirs[family]), trained[family, shape]
    plain = engine(path, "none", K, W)
    adapted = engine(path, adapters, K, W)
    assert adapted.adapters is not None and adapted.adapters.rank == SHAPES[shape]
    greedy = [hf_greedy(path, p, NEW) for p in prompts]
    sampled = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=seed)
    reference = run(plain, "ar", True, prompts, NEW, sampled)
    for mode, decs in all_modes(K):
        assert run(adapted, mode, decs, prompts, NEW) == greedy, f"{family}/{shape} greedy {mode} decs={decs} K={K} W={W}"
        assert run(adapted, mode, decs, prompts, NEW, sampled) == reference, \
            f"{family}/{shape} sampled {mode} decs={decs} K={K} W={W}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapters_do_change_the_proposals(trained, tiny_dirs, family, shape):
    assert readouts_differ(str(tiny_dirs[family]), trained[family, shape], (5, 6, 7, 8, 9))


def proposals(eng: DexEngine, prompt: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    from dexserve.contract.request import GenerationRequest

    eng.reconfigure("dex", True)
    eng.add(GenerationRequest("d", prompt_ids=prompt, max_new_tokens=NEW, ignore_eos=True))
    tokens, rows = [], []
    while eng.active:
        res = eng.step()
        tokens += [ev.token_id for ev in res.tokens]
        rows += [(row.position, row.readout) for ex in res.record.explorers for row in ex]
    return tokens, rows


def test_explorer_processes_load_the_same_adapters(trained, tiny_dirs):
    """The distributed executor's explorer processes read out through the adapters the coordinator resolved:
    the same proposals, round by round, as the reference executor."""
    path, adapters = str(tiny_dirs["qwen3"]), trained["qwen3", "rank4"]
    # K=3 over 4 layers: explorer 2 (its own process) reads out at depth 2 through its adapter
    cfg = dict(explorers=3, width=4, max_context=96, max_batch=1, prefill_chunk=8, adapters=adapters)
    ref = DexEngine.load(path, EngineConfig(**cfg))
    dist = DexEngine.load(path, EngineConfig(**cfg, executor="distributed", transport="shm"))
    try:
        assert dist.adapters == ref.adapters
        assert proposals(dist, (3, 1, 4, 1, 5)) == proposals(ref, (3, 1, 4, 1, 5))
    finally:
        dist.close()


@pytest.mark.parametrize("shape", SHAPES)
def test_adapter_compiles_inside_the_step(trained, tiny_dirs, shape):
    """The adapter runs inside the explorer step: compiled (fullgraph) it proposes what the eager step does."""
    import torch

    path, adapters = str(tiny_dirs["llama"]), trained["llama", shape]
    got = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        eng = DexEngine.load(path, EngineConfig(explorers=2, width=2, max_context=32, max_batch=1, prefill_chunk=4,
                                                compile=compile_, adapters=adapters))
        got.append(proposals(eng, (9, 8, 7)))
    assert got[0] == got[1]
