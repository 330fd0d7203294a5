"""Log-probabilities come from the final-depth readout that commits each token,
so they are `ar`'s in every mode and executor: the committed token's natural-log
probability under the model's own distribution and the N most likely
alternatives, equal to Hugging Face's log_softmax at that position; asking for
them changes no committed token."""

from __future__ import annotations

import math

import pytest
import torch

from engine.conftest import _hf_model
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.request import GenerationRequest, SamplingParams

PROMPT = (5, 77, 300, 12, 9, 41)
NEW = 10
TOL = 2e-4


def run(eng: DexEngine, mode: str, logprobs: int | None, sampling=SamplingParams()):
    eng.reconfigure(mode, True)
    events = []
    eng.add(GenerationRequest("a", prompt_ids=PROMPT, max_new_tokens=NEW, ignore_eos=True, sampling=sampling,
                              logprobs=logprobs))
    eng.add(GenerationRequest("b", prompt_ids=(3, 1, 4), max_new_tokens=NEW, ignore_eos=True))  # asks for none
    while eng.active:
        res = eng.step()
        events += [ev for ev in res.tokens]
    a = [ev for ev in events if ev.request_id == "a"]
    b = [ev for ev in events if ev.request_id == "b"]
    assert all(ev.logprob is None and ev.top_logprobs == () for ev in b)
    return a, [ev.token_id for ev in b]


def hf_logprobs(path: str, tokens: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at each generated position, teacher-forced."""
    with torch.no_grad():
        logits = _hf_model(path)(torch.tensor([PROMPT + tuple(tokens)])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(PROMPT) - 1: len(PROMPT) - 1 + len(tokens)]


def check_against_hf(path: str, events, n: int) -> None:
    tokens = [ev.token_id for ev in events]
    ref = hf_logprobs(path, tokens)
    for i, ev in enumerate(events):
        assert math.isclose(ev.logprob, ref[i, ev.token_id].item(), abs_tol=TOL), (i, ev.logprob)
        assert len(ev.top_logprobs) == n
        values = [v for _, v in ev.top_logprobs]
        assert values == sorted(values, reverse=True)
        for tok, v in ev.top_logprobs:
            assert math.isclose(v, ref[i, tok].item(), abs_tol=TOL)
        if n:
            best = ref[i].topk(n).values
            assert all(math.isclose(v, b.item(), abs_tol=TOL) for v, b in zip(values, best))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logprobs_are_ar_s_in_every_mode(tiny_dirs, family):
    path = str(tiny_dirs[family])
    eng = DexEngine.load(path, EngineConfig(explorers=3, width=4, max_context=64, max_batch=2, prefill_chunk=4))
    assert eng.info.logprobs
    plain, _ = run(eng, "ar", None)
    for mode in ("ar", "dex", "select:1"):
        got, other = run(eng, mode, 5)
        assert [ev.token_id for ev in got] == [ev.token_id for ev in plain], mode  # asking changes no token
        check_against_hf(path, got, 5)
        if mode == "ar":
            # greedy: the committed token is the most likely one
            assert all(ev.top_logprobs[0][0] == ev.token_id for ev in got)
    # zero alternatives: the committed token's log-probability alone
    got, _ = run(eng, "dex", 0)
    check_against_hf(path, got, 0)


def test_sampled_tokens_report_their_own_logprob(tiny_dirs):
    path = str(tiny_dirs["mistral"])
    eng = DexEngine.load(path, EngineConfig(explorers=2, width=4, max_context=64, max_batch=2, prefill_chunk=4))
    sampling = SamplingParams(0.9, 0, 1.0, 123)
    plain, _ = run(eng, "ar", None, sampling)
    got, _ = run(eng, "dex", 3, sampling)
    assert [ev.token_id for ev in got] == [ev.token_id for ev in plain]
    check_against_hf(path, got, 3)


@pytest.mark.parametrize("transport", ["shm", "torch"])
def test_distributed_executor_reports_the_same_logprobs(tiny_dirs, transport):
    path = str(tiny_dirs["qwen2"])
    cfg = dict(explorers=2, width=4, max_context=64, max_batch=2, prefill_chunk=4)
    ref = DexEngine.load(path, EngineConfig(**cfg))
    dist = DexEngine.load(path, EngineConfig(**cfg, executor="distributed", transport=transport))
    try:
        a, _ = run(ref, "dex", 4)
        b, _ = run(dist, "dex", 4)
        assert [ev.token_id for ev in a] == [ev.token_id for ev in b]
        for x, y in zip(a, b):
            assert math.isclose(x.logprob, y.logprob, abs_tol=TOL)
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
    finally:
        dist.close()


def test_compiled_step_reports_the_eager_logprobs(tiny_dirs):
    path = str(tiny_dirs["llama"])
    torch._dynamo.reset()
    outs = []
    for compile_ in (False, True):
        eng = DexEngine.load(path, EngineConfig(explorers=2, width=2, max_context=32, max_batch=2, prefill_chunk=4,
                                                compile=compile_))
        outs.append(run(eng, "dex", 2)[0])
    assert [ev.token_id for ev in outs[0]] == [ev.token_id for ev in outs[1]]
    for x, y in zip(*outs):
        assert math.isclose(x.logprob, y.logprob, abs_tol=TOL)
