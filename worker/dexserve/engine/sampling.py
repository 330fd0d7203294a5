"""Lossless sampling: Gumbel-max with noise fixed per (seed, position).

The token at position p is `argmax(filter(logits_p / T) + g_p)` where g_p is
Gumbel noise drawn from a counter-based hash of (seed, p, vocab index). Every
branch of the lattice that reads out a candidate for position p sees the same
g_p, so a shallow candidate equals the final token exactly when plain
autoregressive sampling with that seed would pick it. No RNG state, no host
round trip: the noise is a pure function, so it runs inside the captured step.

All integer arithmetic stays below 2**63 (31-bit constants times 32-bit values),
so eager, compiled and CUDA code agree bit for bit on the noise bits.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B          # 27-bit odd multiplier (Mueller's 32-bit integer hash)
_GOLDEN = 0x1E3779B1           # odd 29-bit constant to spread vocab indices


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    return (x >> 16) ^ x


def _mix32(x: int) -> int:
    """hash32 on a Python int in [0, 2**32) (the same Mueller hash); 0 maps to 0."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    return (x >> 16) ^ x


def fold_seed(seed: int) -> int:
    """The request's uint64 seed as the 32-bit noise key the executors use:
    low half XOR a hash of the high half. Every one of the 64 bits changes the
    key (seeds 1 and 1 + 2**32 sample differently), and a seed below 2**32 is
    its own key, so existing seeds keep their outputs. Applied once, at
    `DexEngine.add`: every executor (reference, distributed) sees the same key."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return (seed & _MASK32) ^ _mix32(seed >> 32)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) float32 of shape [rows, vocab], a pure function of (seed, position, index)."""
    s = hash32(seed.to(torch.int64) & _MASK32)
    s = hash32(s ^ (position.to(torch.int64) & _MASK32))
    idx = torch.arange(vocab, dtype=torch.int64, device=seed.device)
    h = hash32(s[:, None] ^ (idx[None, :] * _GOLDEN & _MASK32))
    # 24 high bits -> (0, 1), never 0 or 1, exactly representable in float32
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    u = uniform_noise(seed, position, vocab)
    return -torch.log(-torch.log(u))


def filtered_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p (Hugging Face's order); removed
    tokens get -inf. Rows with temperature 0 are returned unscaled (greedy).
    Shapes: logits [W, V]; temperature, top_p float [W]; top_k long [W] (0 = off)."""
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
    drop = drop | ((before >= top_p[:, None]) & (rank > 0))
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    out = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    return torch.where(greedy[:, None], logits, out)


def selection_scores(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Scores whose argmax is the token for `position` (greedy or sampled).
    Ranking the scores orders the candidates a readout proposes."""
    filt = filtered_logits(logits.float(), temperature, top_k, top_p)
    noise = gumbel_noise(seed, position, logits.shape[-1])
    sampled = temperature > 0
    return torch.where(sampled[:, None], filt + noise, filt)
