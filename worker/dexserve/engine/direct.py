"""A compiled host step without dynamo on the call path.

`torch.compile` enters every call through dynamo's frame evaluation (guards,
the compiled frame, AOT autograd's wrappers), a fixed cost per call that weighs
most on short steps (worker/README: a K=2 explorer's one-row step went from
0.54 to 0.47 ms without it). A `DirectGraph` pays it once: it traces one variant of an
`ExplorerStep` (fixed shapes, fixed host choices) with `make_fx`, with every
tensor the step reads (weights, KV, hidden rows, rotary and sampling tables)
as an explicit input, compiles that graph with inductor (the same compiler
and FX graph cache `torch.compile` uses), and calls it with the live tensors.
In-place writes (K/V rows, hidden rows) land in those tensors as they do
through `torch.compile`; the kernels are the same, and so are the bits
(tests/engine/test_direct_graph.py).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def tensor_leaves(step: nn.Module) -> list[tuple[object, str]]:
    """(owner, attribute) of every tensor `step.forward` may read: the step's own
    tensor attributes and its layers' weight fields."""
    leaves: list[tuple[object, str]] = [(step, n) for n, v in vars(step).items() if isinstance(v, torch.Tensor)]
    for lw in getattr(step, "layers", ()):
        leaves += [(lw, f.name) for f in dataclasses.fields(lw) if isinstance(getattr(lw, f.name), torch.Tensor)]
    return leaves


def _set(owner: object, name: str, value: torch.Tensor) -> None:
    if isinstance(owner, nn.Module):
        owner.__dict__[name] = value    # plain attributes, not parameters or buffers
    else:
        setattr(owner, name, value)


@contextmanager
def _swapped(leaves: list[tuple[object, str]], values: tuple[torch.Tensor, ...]) -> Iterator[None]:
    saved = [getattr(o, n) for o, n in leaves]
    for (o, n), v in zip(leaves, values):
        _set(o, n, v)
    try:
        yield
    finally:
        for (o, n), v in zip(leaves, saved):
            _set(o, n, v)


class DirectGraph:
    """One variant of `step` (its host choices in `options`), traced on `example`
    inputs and compiled; `graph(*inputs)` runs it on inputs of the same shapes."""

    def __init__(self, step: nn.Module, example: tuple[torch.Tensor, ...], **options) -> None:
        from torch._inductor import compile as inductor_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        self.leaves = tensor_leaves(step)
        self.values = [getattr(o, n) for o, n in self.leaves]
        n = len(self.leaves)

        def traced(*flat: torch.Tensor) -> torch.Tensor:
            with _swapped(self.leaves, flat[:n]):
                return step.forward(*flat[n:], **options)

        with torch.no_grad():
            gm = make_fx(traced, tracing_mode="fake")(*self.values, *example)
            baked = [node.target for node in gm.graph.nodes if node.op == "get_attr"]
            if baked:   # a tensor reached from somewhere tensor_leaves does not look would be frozen in
                raise RuntimeError(f"step variant {options} reads tensors that are not inputs: {baked}")
            self.compiled = inductor_compile(gm, [*self.values, *example])

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        # (no grad-mode switch per call: nothing here requires grad, and the executors run under no_grad)
        return self.compiled(*self.values, *inputs)
