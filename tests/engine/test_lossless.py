"""Lossless: every mode, K, W, DECS setting and batch mix commits exactly what
Hugging Face `generate(do_sample=False)` does, token for token."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.conftest import FAMILIES, hf_greedy, shipped_available
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.model_card import shipped_model_dir
from dexserve.contract.request import GenerationRequest, SamplingParams

NEW = 12


@functools.lru_cache(maxsize=64)
def engine(path: str, K: int, W: int, batch: int = 1, policy: str = "priority", context: int = 96) -> DexEngine:
    return DexEngine.load(path, EngineConfig(explorers=K, width=W, max_context=context, max_batch=batch, policy=policy,
                                          prefill_chunk=8))


def run(eng: DexEngine, mode: str, decs: bool, prompts: list[tuple[int, ...]], new: int = NEW,
        sampling: SamplingParams = SamplingParams()) -> list[tuple[int, ...]]:
    """Decode all prompts together (a batch mix) and return each one's tokens."""
    eng.reconfigure(mode, decs)
    out: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or eng.active:
        while pending and eng.has_capacity():
            i, p = pending.pop(0)
            eng.add(GenerationRequest(f"q{i}", prompt_ids=p, max_new_tokens=new, ignore_eos=True, sampling=sampling))
            out[f"q{i}"] = []
        res = eng.step()
        eng.lattice.check_invariants()
        for ev in res.tokens:
            out[ev.request_id].append(ev.token_id)
    return [tuple(out[f"q{i}"]) for i in range(len(prompts))]


def modes(K: int) -> list[str]:
    return ["ar", "dex"] + [f"select:{j}" for j in range(1, K)]


prompt_ids = st.lists(st.integers(1, 2047), min_size=1, max_size=20).map(tuple)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompt_ids, K=st.sampled_from([2, 3, 4]), W=st.sampled_from([1, 2, 8]), decs=st.booleans())
def test_tiny_models_equal_hf_generate(tiny_dirs, family, prompt, K, W, decs):
    path = str(tiny_dirs[family])
    ref = hf_greedy(path, prompt, NEW)
    eng = engine(path, K, W)
    for mode in modes(K):
        (got,) = run(eng, mode, decs, [prompt])
        assert got == ref, f"{family} mode={mode} K={K} W={W} decs={decs}"


@pytest.mark.parametrize("K", [2, 3, 4, 8])
@pytest.mark.parametrize("W", [1, 2, 8])
def test_shipped_model_equals_hf_generate(K, W):
    assert shipped_available(), "the shipped model's weights are part of the repository"
    from dexserve.engine.measure import load_prompts

    path = str(shipped_model_dir())
    eng = engine(path, K, W, context=256)
    prompts = [tuple(eng.encode(GenerationRequest("x", prompt=p))) for p in load_prompts(shipped_model_dir() / "heldout_prompts.jsonl", 3)]
    for prompt in prompts:
        ref = hf_greedy(path, prompt, 16)
        for mode in modes(K) if K <= 4 else ["ar", "dex", "select:1", f"select:{K - 1}"]:
            for decs in (True, False):
                (got,) = run(eng, mode, decs, [prompt], new=16)
                assert got == ref, f"mode={mode} K={K} W={W} decs={decs}"


def test_layers_as_explorers_K_equals_L(tiny_dirs):
    path = str(tiny_dirs["llama"])  # 4 layers: K = L = 4 puts a boundary after every layer
    prompt = (5, 77, 300, 12)
    ref = hf_greedy(path, prompt, NEW)
    eng = engine(path, 4, 2)
    for mode in modes(4):
        assert run(eng, mode, True, [prompt])[0] == ref


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(prompt_ids, min_size=2, max_size=5), W=st.sampled_from([1, 2, 8]),
       policy=st.sampled_from(["priority", "oldest"]))
def test_batch_mix_equals_each_request_alone(tiny_dirs, prompts, W, policy):
    """Requests decoded together, joining and leaving at different rounds, each
    commit what they would alone; capacity is shared and often binds."""
    path = str(tiny_dirs["qwen3"])
    eng = engine(path, 3, W, batch=3, policy=policy)
    refs = [hf_greedy(path, p, NEW) for p in prompts]
    for mode, decs in (("dex", True), ("dex", False), ("select:1", True), ("ar", True)):
        assert run(eng, mode, decs, prompts) == refs, f"{mode} decs={decs}"


@pytest.mark.parametrize("sampling", [SamplingParams(0.7, 0, 1.0, 1), SamplingParams(1.0, 20, 1.0, 2),
                                      SamplingParams(1.3, 0, 0.9, 3), SamplingParams(0.9, 50, 0.8, 4),
                                      SamplingParams(2.0, 0, 1.0, 5)])
def test_sampled_dex_equals_sampled_ar(tiny_dirs, sampling):
    path = str(tiny_dirs["llama"])
    prompts = [(3, 4, 5), (900, 17), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)]
    for K, W in ((2, 2), (4, 8), (3, 1)):
        eng = engine(path, K, W, batch=2)
        ar = run(eng, "ar", True, prompts, sampling=sampling)
        assert len(set(ar)) == len(ar)
        for mode in ("dex", "select:1"):
            for decs in (True, False):
                assert run(eng, mode, decs, prompts, sampling=sampling) == ar, f"{mode} K={K} W={W} decs={decs}"


def test_seed_changes_samples_and_is_reproducible(tiny_dirs):
    path = str(tiny_dirs["llama"])
    eng = engine(path, 2, 2)
    a = run(eng, "dex", True, [(5, 6, 7)], sampling=SamplingParams(1.0, 0, 1.0, 11))
    b = run(eng, "dex", True, [(5, 6, 7)], sampling=SamplingParams(1.0, 0, 1.0, 11))
    c = run(eng, "dex", True, [(5, 6, 7)], sampling=SamplingParams(1.0, 0, 1.0, 12))
    assert a == b
    assert a != c
