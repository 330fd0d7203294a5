"""The sampler draws from the model's (filtered) softmax, with noise that is a
pure function of (seed, position)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from engine.conftest import hf_logits
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.request import GenerationRequest, SamplingParams, TokenEvent
from dexserve.engine.sampling import filtered_logits, selection_scores, uniform_noise


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    probs = probs.astype(np.float64) / probs.astype(np.float64).sum()
    n = counts.sum()
    keep = probs * n >= 5  # chi-square needs expected counts >= 5: pool the tail
    obs, exp = list(counts[keep]), list(probs[keep] * n)
    tail = probs[~keep].sum() * n
    if tail >= 5:
        obs.append(counts[~keep].sum())
        exp.append(tail)
    else:  # too small to stand alone: fold into the smallest kept category
        i = int(np.argmin(exp))
        obs[i] += counts[~keep].sum()
        exp[i] += tail
    return chisquare(np.array(obs, dtype=np.float64), np.array(exp)).pvalue


def _draw(logits: torch.Tensor, n: int, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    rows = torch.arange(n)
    scores = selection_scores(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k),
                              torch.full((n,), top_p), rows * 7919 + 13, torch.full((n,), 5))
    return np.bincount(scores.argmax(-1).numpy(), minlength=logits.shape[-1])


def test_sampler_matches_softmax_chi_square():
    torch.manual_seed(0)
    logits = torch.randn(64)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 10, 1.0), (1.0, 0, 0.7), (0.8, 20, 0.9)):
        counts = _draw(logits, 40_000, temperature, top_k, top_p)
        probs = torch.softmax(filtered_logits(logits[None], torch.tensor([temperature]), torch.tensor([top_k]),
                                              torch.tensor([top_p]))[0], -1).numpy()
        assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
        assert _chi2(counts, probs) > 1e-3, (temperature, top_k, top_p)


def test_chi_square_detects_a_wrong_sampler():
    """The test above can fail: sampling at the wrong temperature is caught."""
    torch.manual_seed(0)
    logits = torch.randn(64) * 2
    counts = _draw(logits, 40_000, 1.0, 0, 1.0)
    wrong = torch.softmax(logits / 1.2, -1).numpy()
    assert _chi2(counts, wrong) < 1e-6


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    one = torch.ones(1)
    k2 = filtered_logits(logits, one, torch.tensor([2]), one)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = torch.softmax(logits[0], -1)
    top_p = float(p[0] + p[1] / 2)  # needs the first two tokens to reach it
    f = filtered_logits(logits, one, torch.tensor([0]), torch.tensor([top_p]))
    assert torch.isfinite(f[0, :2]).all() and torch.isinf(f[0, 2:]).all()
    greedy = filtered_logits(logits, torch.zeros(1), torch.tensor([1]), torch.tensor([0.1]))
    assert torch.equal(greedy, logits)


def test_noise_is_a_pure_function_of_seed_and_position():
    a = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([5, 6, 5]), 1000)
    b = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([5, 6, 5]), 1000)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert 0 < a.min() and a.max() < 1
    big = uniform_noise(torch.arange(400), torch.arange(400) % 7, 500)
    assert abs(big.mean().item() - 0.5) < 0.005            # 200k draws: std of the mean ~0.0006
    assert abs(big.std().item() - (1 / 12) ** 0.5) < 0.005


def test_engine_ar_first_token_follows_model_softmax(tiny_dirs):
    """End to end: the ar engine's first sampled token over many seeds follows
    softmax(logits / T) of the reference model."""
    path = str(tiny_dirs["llama"])
    prompt = (11, 22, 33)
    eng = DexEngine.load(path, EngineConfig(explorers=2, width=1, mode="ar", max_context=32, max_batch=1, prefill_chunk=4))
    n, T = 1500, 1.0
    counts = np.zeros(2048, dtype=np.int64)
    for seed in range(n):
        req = GenerationRequest(f"s{seed}", prompt_ids=prompt, max_new_tokens=1, ignore_eos=True,
                                sampling=SamplingParams(T, 0, 1.0, seed))
        (tok,) = [ev.token_id for ev in eng.generate(req) if isinstance(ev, TokenEvent)]
        counts[tok] += 1
    probs = torch.softmax(hf_logits(path, prompt) / T, -1).numpy()
    assert _chi2(counts, probs) > 1e-3
