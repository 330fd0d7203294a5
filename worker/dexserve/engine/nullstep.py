"""A null step: an explorer step that costs (almost) nothing and computes no
model, for measuring what a round costs besides the steps (the lattice, the
packing, the signalling, Python), independent of the hardware.

`ExecutorSpec(null_step=True)` substitutes it for the tensor step in both
executors. It reads the same packed rows and returns ranked candidates in the
same format, from a scripted "model": the final token after (token, position)
is `null_next(token, position)`; every boundary ranks it first, except
boundary 1 on one node in four (it ranks it second), so the lattice spawns,
commits at boundary 1 or 2, falls back (K = 2, one candidate) and drops
branches as it does on a real model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dexserve.engine.step import BufferSpec, StepInputs, span_buckets, span_for


def null_next(token: int, position: int, vocab: int) -> int:
    """The null model's final-depth token for position + 1."""
    return (token * 2654435761 + position * 40503 + 12345) % vocab


def null_missed(token: int, position: int) -> bool:
    """Does boundary 1 rank the final token second for this node?"""
    return (token + position) % 4 == 0


class NullRunner:
    """Stands where a `StepRunner` stands: `runner(inputs, sampled, span)` ->
    [width, M] candidates (a preallocated tensor, rewritten each call)."""

    def __init__(self, width: int, depth: int, explorers: int, candidates: int, vocab: int,
                 buffers: BufferSpec) -> None:
        self.width = width
        self.depth = depth              # the boundary it reads out at (K: final depth)
        self.final = depth == explorers
        self.vocab = vocab
        self.buckets = span_buckets(buffers.max_context)
        self.out = torch.zeros(width, candidates, dtype=torch.long)
        self._out = self.out.numpy()
        self._rank = np.arange(candidates, dtype=np.int64)
        self.compile = self.use_graph = False

    def span(self, need: int) -> int:
        return span_for(need, self.buckets)

    def __call__(self, inputs: StepInputs, sampled: bool = True, span: int | None = None,
                 rows: int | None = None, logprobs: bool = False) -> torch.Tensor:
        tok, pos = inputs.token.numpy(), inputs.position.numpy()
        y = (tok * 2654435761 + pos * 40503 + 12345) % self.vocab
        c = (y[:, None] + self._rank[None, :]) % self.vocab
        if self.depth == 1 and not self.final and c.shape[1] > 1:
            miss = (tok + pos) % 4 == 0
            c[miss, 0], c[miss, 1] = c[miss, 1], y[miss]
        elif self.depth == 1 and not self.final:
            c[(tok + pos) % 4 == 0, 0] = (y[(tok + pos) % 4 == 0] + 1) % self.vocab
        self._out[:] = c
        return self.out

    def warm_up(self, sampled: Sequence[bool] = (False,)) -> None:
        pass


class NullStep:
    """Stands where an `ExplorerStep` stands for what executors call on it."""

    def __init__(self, buffers: BufferSpec, hidden: torch.Tensor | None = None, hidden_size: int = 1) -> None:
        self.spec = buffers
        self.hidden = hidden if hidden is not None else torch.zeros(buffers.hidden_rows, hidden_size)

        class _Dims:
            hidden = self.hidden.shape[1]
        self.dims = _Dims

    def retire(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        pass

    def set_sampling(self, index: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        pass
