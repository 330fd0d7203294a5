"""Executors carry out the lattice's plans; they decide nothing.

`ReferenceExecutor` runs the K explorer steps one after another in this
process: correct, and the base every test uses. The distributed executor
(`dexserve.engine.distributed`) runs the same steps in K processes. Swapping
executors changes no decision and no output.

`StepRunner` is where a step is run eagerly, compiled (`torch.compile`,
fullgraph, static shapes) or captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from dexserve.engine.lattice import Plan, PlanRow, Readout
from dexserve.engine.model import load_weights, rotary_tables
from dexserve.engine.model_card import ModelCard
from dexserve.engine.request import SamplingParams
from dexserve.engine.step import BufferSpec, ExplorerStep, StepInputs


@dataclass(frozen=True)
class ExecutorSpec:
    boundaries: tuple[int, ...]   # 0 = b_0 < b_1 < ... < b_K = L
    buffers: BufferSpec
    widths: tuple[int, ...]       # rows per explorer step
    candidates: int               # ranked candidates per readout
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    compile: bool = False         # torch.compile(fullgraph=True) each step
    cuda_graphs: bool = True      # on CUDA, capture each step once and replay

    @property
    def explorers(self) -> int:
        return len(self.boundaries) - 1

    def layers(self, k: int) -> range:
        return range(self.boundaries[k], self.boundaries[k + 1])


class ExecutorFailure(RuntimeError):
    """The executor lost state it cannot rebuild in place (e.g. an explorer process
    died). The engine fails the requests it held and restarts the executor."""


class Executor(Protocol):
    spec: ExecutorSpec

    def set_sampling(self, index: int, params: SamplingParams) -> None: ...
    def prefill(self, index: int, token_ids: Sequence[int]) -> None: ...
    def run(self, plan: Plan) -> Readout: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...


def even_boundaries(layers: int, explorers: int) -> tuple[int, ...]:
    """Cut L layers into K nearly equal segments (DEX-1/K)."""
    if not 1 <= explorers <= layers:
        raise ValueError(f"explorers must be in 1..{layers} (the model's layer count), got {explorers}")
    return tuple(k * layers // explorers for k in range(explorers + 1))


class StepRunner:
    """Runs one explorer step at one static width: eager, compiled, or as a CUDA graph."""

    def __init__(self, step: ExplorerStep, width: int, spec: ExecutorSpec) -> None:
        self.step = step
        self.width = width
        self.device = torch.device(spec.device)
        self.fn = torch.compile(step, fullgraph=True, dynamic=False) if spec.compile else step
        self.use_graph = spec.cuda_graphs and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[torch.Tensor, ...] | None = None
        self.static_out: torch.Tensor | None = None

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        args = tuple(t.to(self.device, non_blocking=True) for t in inputs.as_tuple())
        if not self.use_graph:
            return self.fn(*args)
        if self.graph is None:
            self._capture(args)
        assert self.static_in is not None and self.static_out is not None and self.graph is not None
        for dst, src in zip(self.static_in, args):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_out

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        """Warm up on a side stream, then capture with static input buffers.
        Warm-up rows all point at scratch rows so no real state changes."""
        self.static_in = tuple(a.clone() for a in args)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(*self.static_in)


class RowPacker:
    """Turns plan rows into the static-shaped index tensors of a step."""

    def __init__(self, buffers: BufferSpec, sliding_window: int | None) -> None:
        self.b = buffers
        self.window = sliding_window

    def pad(self, width: int) -> StepInputs:
        b = self.b
        return StepInputs(
            token=torch.zeros(width, dtype=torch.long), position=torch.zeros(width, dtype=torch.long),
            slot=torch.full((width,), b.hidden_scratch, dtype=torch.long),
            kv_row=torch.full((width,), b.kv_scratch, dtype=torch.long),
            request=torch.zeros(width, dtype=torch.long), lo=torch.zeros(width, dtype=torch.long),
            hi=torch.zeros(width, dtype=torch.long),
            anc=torch.full((width, b.ancestors), b.kv_scratch, dtype=torch.long))

    def _ctx_range(self, request_index: int, position: int, ctx_len: int) -> tuple[int, int]:
        base = request_index * self.b.max_context
        start = 0 if self.window is None else max(0, position - self.window + 1)
        return base + start, base + ctx_len

    def lattice(self, rows: Sequence[PlanRow], width: int) -> StepInputs:
        x = self.pad(width)
        for i, r in enumerate(rows):
            own = self.b.lattice_kv_row(r.slot)
            x.token[i], x.position[i], x.slot[i], x.kv_row[i], x.request[i] = r.token, r.position, r.slot, own, r.request_index
            x.lo[i], x.hi[i] = self._ctx_range(r.request_index, r.position, r.ctx_len)
            anc = [self.b.lattice_kv_row(s) for s in r.ancestor_slots]
            if len(anc) > self.b.ancestors:
                raise RuntimeError(f"node {r.node} has {len(anc)} uncommitted ancestors, more than {self.b.ancestors}")
            x.anc[i] = torch.tensor(anc + [own] * (self.b.ancestors - len(anc)))
        return x

    def prefill(self, index: int, token_ids: Sequence[int], start: int, width: int) -> StepInputs:
        """Rows for prompt positions start..start+len-1, written straight to the context."""
        x = self.pad(width)
        base = index * self.b.max_context
        for i, tok in enumerate(token_ids):
            pos = start + i
            x.token[i], x.position[i], x.request[i] = tok, pos, index
            x.slot[i] = self.b.lattice_slots + i
            x.kv_row[i] = base + pos
            x.lo[i], x.hi[i] = self._ctx_range(index, pos, pos)
            x.anc[i] = base + pos
        return x


class ReferenceExecutor:
    """All K explorers in this process, one after another."""

    def __init__(self, card: ModelCard, spec: ExecutorSpec) -> None:
        self.spec = spec
        weights = load_weights(card, range(card.num_layers), need_embed=True, dtype=spec.dtype, device=spec.device)
        cos, sin = rotary_tables(card, spec.buffers.max_context, device=spec.device)
        self.packer = RowPacker(spec.buffers, weights.dims.sliding_window)
        hidden = torch.zeros(spec.buffers.hidden_rows, weights.dims.hidden, device=spec.device, dtype=spec.dtype)
        self.steps = [ExplorerStep(weights, spec.layers(k), spec.buffers, cos, sin, spec.candidates,
                                   first=(k == 0), device=spec.device, dtype=spec.dtype, hidden=hidden)
                      for k in range(spec.explorers)]
        self.runners = [StepRunner(s, w, spec) for s, w in zip(self.steps, spec.widths)]
        self.prefill_runners = [StepRunner(s, spec.buffers.prefill_rows, spec) for s in self.steps]

    def set_sampling(self, index: int, params: SamplingParams) -> None:
        for s in self.steps:
            s.set_sampling(index, params.temperature, params.top_k, params.top_p, params.seed)

    @torch.no_grad()
    def prefill(self, index: int, token_ids: Sequence[int]) -> None:
        P = self.spec.buffers.prefill_rows
        for start in range(0, len(token_ids), P):
            inputs = self.packer.prefill(index, token_ids[start:start + P], start, P)
            for runner in self.prefill_runners:
                runner(inputs)

    @torch.no_grad()
    def run(self, plan: Plan) -> Readout:
        self.apply_retire(plan, self.steps)
        outs = []
        for rows, runner in zip(plan.rows, self.runners):
            outs.append(runner(self.packer.lattice(rows, runner.width)) if rows else None)
        # the one host sync of the round
        return Readout(tuple(
            tuple(tuple(c) for c in out[: len(rows)].tolist()) if out is not None else ()
            for rows, out in zip(plan.rows, outs)))

    def apply_retire(self, plan: Plan, steps: Sequence[ExplorerStep]) -> None:
        if not plan.retire:
            return
        b = self.spec.buffers
        src = torch.tensor([b.lattice_kv_row(r.slot) for r in plan.retire], device=self.spec.device)
        dst = torch.tensor([r.request_index * b.max_context + r.position for r in plan.retire], device=self.spec.device)
        for s in steps:
            s.retire(src, dst)

    def restart(self) -> None:
        """Nothing to rebuild: stale KV rows are never visible to a new request."""

    def close(self) -> None:
        pass
