"""Executors carry out the lattice's plans; they decide nothing.

`ReferenceExecutor` runs the K explorer steps one after another in this
process: correct, and the base every test uses. The distributed executor
(`dexserve.engine.distributed`) runs the same steps in K processes. Swapping
executors changes no decision and no output.

`StepRunner` is where a step is run eagerly, compiled (`torch.compile`,
fullgraph, static shapes) or captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from dexserve.engine.adapters import AdapterInfo
from dexserve.engine.direct import DirectGraph
from dexserve.engine.lattice import Plan, PlanRow, Readout
from dexserve.engine.model import load_weights, rotary_tables
from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import SamplingParams
from dexserve.engine.step import BufferSpec, ExplorerStep, StepInputs, span_buckets, span_for


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
    row_buckets: bool = True      # a round runs the narrowest built width that holds its rows
    vocab: int = 0                # the model's vocabulary (sizes the final readout's log-probabilities)
    null_step: bool = False       # steps cost nothing (scripted readouts): measures coordination alone
    adapters: AdapterInfo | None = None   # boundary adapters, checked against the model and this grid

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
    # A prompt chunk's prefill in parts: `prefill(..., part=k)` runs part k of one chunk
    # (parts in order, the chunk's other parts before any other chunk's). The reference
    # executor's parts are its K explorers; 1: a chunk runs whole (the distributed
    # executor's explorers pipeline a command's chunks themselves).
    prefill_parts: int

    def prefill(self, index: int, token_ids: Sequence[int], start: int = 0, part: int | None = None) -> None: ...
    def run(self, plan: Plan, logprobs: bool = False) -> Readout: ...
    def final_logprobs(self) -> list[list[int]] | None: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...


def even_boundaries(layers: int, explorers: int) -> tuple[int, ...]:
    """Cut L layers into K nearly equal segments (DEX-1/K)."""
    if not 1 <= explorers <= layers:
        raise ValueError(f"explorers must be in 1..{layers} (the model's layer count), got {explorers}")
    return tuple(k * layers // explorers for k in range(explorers + 1))


Variant = tuple[bool, int, int, bool]  # (sampled, attention span, rows, logprobs)


def row_buckets(width: int) -> tuple[int, ...]:
    """The row counts a CUDA-graph step is captured for: powers of two below W,
    and W. A round replays the narrowest that holds its rows."""
    out, b = [], 1
    while b < width:
        out.append(b)
        b *= 2
    return (*out, width)


def check_prefill_part(part: int, positions: int, parts: int, chunk: int) -> None:
    """A prefill part (`Executor.prefill(..., part=k)`) is one of the executor's `parts` and covers
    one chunk of at most `chunk` positions."""
    if positions > chunk or not 0 <= part < parts:
        raise ValueError(f"prefill part {part} of a chunk of {positions} positions "
                         f"(parts 0..{parts - 1}, chunks of at most {chunk})")


class StepRunner:
    """Runs one explorer step: eager, compiled, or as a CUDA graph.

    A round runs only as many rows as it has (the leading rows of the
    executor's one row array), not the explorer's width W: on the host exactly
    that many (the compiled step is built with a dynamic row count: one graph
    for one row, one for any other count), as a CUDA graph the narrowest
    captured bucket that holds them (`row_buckets`). Other variants: greedy or
    sampled, times the attention-span buckets; each is compiled or captured at
    warm-up or on first use and replayed after."""

    compiled_variants = 0  # graphs compiled in this process so far (all runners)

    def __init__(self, step: ExplorerStep, width: int, spec: ExecutorSpec, prefill: bool = False) -> None:
        """`prefill`: this runner runs prompt chunks (full width, one request's
        consecutive positions over one shared slice of keys); otherwise lattice
        rounds, narrowed to their rows as the spec's `row_buckets` says."""
        self.step = step
        self.width = width
        self.prefill = prefill
        self.narrow = spec.row_buckets and not prefill
        self.device = torch.device(spec.device)
        self.buckets = span_buckets(spec.buffers.max_context)
        self.compile = spec.compile
        self.use_graph = spec.cuda_graphs and self.device.type == "cuda"
        self.on_host = self.device.type == "cpu"
        # compiled one-row lattice steps compute their projections as `model.row_dots`
        # (its own graph either way: a compiled host step has one graph for one row)
        self.dots = self.compile and self.on_host and not prefill
        # row counts built ahead of time: CUDA graphs per bucket; a compiled host step
        # one graph for 1 row and one (dynamic) for 2..W
        self.widths = (row_buckets(width) if self.use_graph else tuple(sorted({1, min(2, width), width}))) \
            if self.narrow else (width,)
        self._prefixes: dict[int, tuple[StepInputs, dict[int, StepInputs]]] = {}
        if spec.compile:
            use_compile_cache(cpu=self.device.type == "cpu")
            # dynamo counts graphs per code object, i.e. over every step in this process:
            # raise its limit by this runner's variants (greedy/sampled x spans x row counts)
            StepRunner.compiled_variants += 4 * len(self.buckets) * len(self.widths)
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, StepRunner.compiled_variants)
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 2 * StepRunner.compiled_variants)
        self.fn = torch.compile(step, fullgraph=True, dynamic=False) if spec.compile else step
        # compiled one-row host variants skip dynamo's per-call cost (`direct.DirectGraph`)
        self.direct: dict[tuple[bool, int, bool], DirectGraph] = {}
        # one captured graph per variant, with its static inputs and output
        self.graphs: dict[Variant, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def span(self, need: int) -> int:
        return span_for(need, self.buckets)

    def rows_for(self, rows: int) -> int:
        """How many rows a round of `rows` real rows runs."""
        if not self.narrow:
            return self.width
        if not self.use_graph:
            return max(1, rows)
        for w in self.widths:
            if w >= rows:
                return w
        raise ValueError(f"{rows} rows, more than the step's width {self.width}")

    def prefix(self, inputs: StepInputs, rows: int) -> StepInputs:
        """The first `rows` rows of `inputs` (views built once per input array
        and row count; a compiled step sees the row count of 2 or more as dynamic)."""
        held = self._prefixes.get(id(inputs))
        if held is None or held[0] is not inputs:
            held = self._prefixes[id(inputs)] = (inputs, {})
        view = held[1].get(rows)
        if view is None:
            view = StepInputs(*(t[:rows] for t in inputs.as_tuple()))
            if self.compile and not self.use_graph and rows > 1:
                for t in view.as_tuple():
                    torch._dynamo.mark_dynamic(t, 0, min=2, max=self.width)
            held[1][rows] = view
        return view

    def __call__(self, inputs: StepInputs, sampled: bool = True, span: int | None = None,
                 rows: int | None = None, logprobs: bool = False) -> torch.Tensor:
        """`span`: the bucket for the round (`span_for` of the longest hi - lo);
        computed here from host-side inputs when not given. `rows`: how many
        leading rows of `inputs` are real (the rest is padding; default: all);
        the candidates returned have one row per row run (`rows_for`).
        `logprobs`: the final depth also returns the readout's log-probabilities
        (`step.logprob_columns`) after the candidates (built on first use)."""
        if rows is not None and self.narrow:
            inputs = self.prefix(inputs, self.rows_for(rows))
        if span is None:
            lo, hi = inputs.lo.cpu().numpy(), inputs.hi.cpu().numpy()
            span = self.span(chunk_need(lo, hi) if self.prefill else int((hi - lo).max()))
        if self.on_host:
            args = inputs.as_tuple()
            if self.dots and args[0].shape[0] == 1:   # the hot path: one row, compiled, row dots
                graph = self.direct.get((sampled, span, logprobs))
                if graph is None:
                    graph = self.direct[(sampled, span, logprobs)] = DirectGraph(
                        self.step, args, sampled=sampled, span=span, logprobs=logprobs, prefill=False, dots=True)
                return graph(*args)
            # host tensors are the step's inputs as they are: no copies, no keyword arguments
            return self.fn(*args, sampled, span, logprobs, self.prefill, False)
        args = tuple(t.to(self.device, non_blocking=True) for t in inputs.as_tuple())
        if not self.use_graph:
            return self.fn(*args, sampled=sampled, span=span, logprobs=logprobs, prefill=self.prefill)
        variant = (sampled, span, args[0].shape[0], logprobs)
        if variant not in self.graphs:
            self.graphs[variant] = self._capture(variant)
        graph, static_in, static_out = self.graphs[variant]
        for dst, src in zip(static_in, args):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out

    @property
    def ahead_of_time(self) -> bool:
        """Compiled or graph-captured variants are built before serving, not mid-stream."""
        return self.compile or self.use_graph

    @torch.no_grad()
    def warm_up(self, sampled: Sequence[bool] = (False, True)) -> None:
        """Build every variant now, on padding rows (they touch only scratch rows)."""
        if not self.ahead_of_time:
            return
        pad = RowPacker.padding(self.step.spec, self.width)
        for s in sampled:
            for span in self.buckets:
                for rows in self.widths:
                    self(pad, s, span, rows)

    def _capture(self, variant: Variant):
        """Warm up on a side stream, then capture with static input buffers.
        The warm-up and capture inputs are padding rows (scratch KV and hidden
        rows), so capturing changes no real state."""
        sampled, span, rows, logprobs = variant
        pad = RowPacker.padding(self.step.spec, rows)
        static_in = tuple(p.to(self.device) for p in pad.as_tuple())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.fn(*static_in, sampled=sampled, span=span, logprobs=logprobs, prefill=self.prefill)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in, sampled=sampled, span=span, logprobs=logprobs, prefill=self.prefill)
        return graph, static_in, static_out


def settle(device: torch.device) -> None:
    """Wait for the device's queued work. A prefill command reads nothing back, so on a GPU it would
    return once its kernels are queued: the engine times each chunk to share a round's time between
    prefill and the running streams (`prefill_share`), and must see what the chunk cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_cache_dir() -> str:
    """Where compiled steps are cached across start-ups: $TORCHINDUCTOR_CACHE_DIR if
    set, else $XDG_CACHE_HOME/dexserve/inductor (default ~/.cache/dexserve/inductor)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(base, "dexserve", "inductor")


def use_compile_cache(cpu: bool = False) -> None:
    """Persist inductor's compiled graphs (FX graph and AOT autograd caches) in a
    stable per-user directory, so a second start-up loads instead of compiling.
    Explorer processes inherit the environment variable."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    # CPU: inductor's C++ wrapper instead of its Python one (less per-call host
    # time; ~1.2x ar tok/s on dexcode-6m)
    if cpu:
        inductor_config.cpp_wrapper = True


def warm_up(lattice: Sequence[StepRunner], prefill: Sequence[StepRunner]) -> None:
    """Compile or capture variants at start-up (prefill is always greedy). CUDA
    graphs: all of them. CPU compile: the greedy ones; a sampled variant compiles
    on the first sampled round (seconds of compile per explorer, once)."""
    # CUDA graphs: torch before 2.9 runs a full gc.collect() at every capture (hundreds
    # per engine, a tenth of a second each over torch + transformers' heap); frozen, the
    # heap is skipped, and no automatic collection frees an old graph mid-capture
    graphs, enabled = any(r.use_graph for r in (*lattice, *prefill)), gc.isenabled()
    if graphs:
        gc.disable()
        gc.freeze()
    try:
        for r in lattice:
            r.warm_up(sampled=(False, True) if r.use_graph else (False,))
        for r in prefill:
            r.warm_up(sampled=(False,))
    finally:
        if graphs:
            gc.unfreeze()
            if enabled:
                gc.enable()


class RowPacker:
    """Turns plan rows into the static-shaped index rows of a step, written in
    place into a preallocated [width, 7 + A] int64 array (the executors keep
    the array and its torch views for the life of the step: a round allocates
    no array and builds no tensor)."""

    def __init__(self, buffers: BufferSpec, sliding_window: int | None) -> None:
        self.b = buffers
        self.window = sliding_window
        self.pad_row = self._padded(buffers, 1)[0]

    @staticmethod
    def _padded(b: BufferSpec, width: int) -> np.ndarray:
        """[width, 7 + A] int64: token, position, slot, kv_row, request, lo, hi, ancestors.
        Padding rows read and write only scratch rows and see only the scratch KV row."""
        m = np.zeros((width, 7 + b.ancestors), dtype=np.int64)
        m[:, 2] = b.hidden_scratch
        m[:, 3] = b.kv_scratch
        m[:, 7:] = b.kv_scratch
        return m

    @staticmethod
    def _inputs(m: np.ndarray) -> StepInputs:
        t = torch.from_numpy(m)
        return StepInputs(*(t[:, i] for i in range(7)), anc=t[:, 7:])

    @classmethod
    def padding(cls, b: BufferSpec, width: int) -> StepInputs:
        return cls._inputs(cls._padded(b, width))

    @classmethod
    def buffer(cls, b: BufferSpec, width: int) -> tuple[np.ndarray, StepInputs]:
        """A padded row array and its step-input views (the same memory)."""
        m = cls._padded(b, width)
        return m, cls._inputs(m)

    def _lo(self, request_index: int, position: int) -> int:
        start = 0 if self.window is None else max(0, position - self.window + 1)
        return request_index * self.b.max_context + start

    def fill(self, m: np.ndarray, rows: Sequence[PlanRow], filled: int) -> tuple[int, int]:
        """Write `rows` into `m` (rows [len(rows), filled) back to padding: they held
        the previous round's rows). Returns (rows written, longest hi - lo)."""
        b = self.b
        base = b.max_batch * b.max_context
        C, A, win = b.max_context, b.ancestors, self.window
        need = 0
        for i, r in enumerate(rows):
            own = base + r.slot
            anc = r.ancestor_slots
            if len(anc) > A:
                raise RuntimeError(f"node {r.node} has {len(anc)} uncommitted ancestors, more than {A}")
            ctx = r.request_index * C
            lo = ctx if win is None else ctx + max(0, r.position - win + 1)
            hi = ctx + r.ctx_len
            if hi - lo > need:
                need = hi - lo
            m[i] = (r.token, r.position, r.slot, own, r.request_index, lo, hi,
                    *[base + s for s in anc], *(own,) * (A - len(anc)))
        n = len(rows)
        if filled > n:
            m[n:filled] = self.pad_row
        return n, need

    def lattice(self, rows: Sequence[PlanRow], width: int) -> StepInputs:
        """Fresh inputs for `rows` (tests and one-off callers; executors `fill` in place)."""
        m = self._padded(self.b, width)
        self.fill(m, rows, 0)
        return self._inputs(m)

    def fill_prefill(self, m: np.ndarray, index: int, token_ids: Sequence[int], start: int, chunk: int = 0) -> int:
        """Rows for prompt positions start..start+len-1, written straight to the
        context, their hidden states in prefill chunk `chunk`'s rows; the rest of
        `m` becomes padding. Returns the longest hi - lo."""
        b = self.b
        m[:] = self.pad_row
        n = len(token_ids)
        pos = np.arange(start, start + n)
        base = index * b.max_context
        m[:n, 0] = token_ids
        m[:n, 1] = pos
        m[:n, 2] = b.lattice_slots + chunk * b.prefill_rows + np.arange(n)
        m[:n, 3] = base + pos
        m[:n, 4] = index
        m[:n, 5] = [self._lo(index, p) for p in pos] if self.window else base
        m[:n, 6] = base + pos
        m[:n, 7:] = (base + pos)[:, None]
        return prefill_need(m)

    def prefill(self, index: int, token_ids: Sequence[int], start: int, width: int) -> StepInputs:
        """Rows for prompt positions start..start+len-1, written straight to the context."""
        m = self._padded(self.b, width)
        self.fill_prefill(m, index, token_ids, start)
        return self._inputs(m)


def chunk_need(lo: np.ndarray, hi: np.ndarray) -> int:
    """The keys a prompt chunk's shared slice must hold: from its first row's lo to
    the last row's own key (hi), so the span bucket it needs (`prefill_keys`)."""
    return int(hi.max() - lo[0] + 1)


def prefill_need(m: np.ndarray) -> int:
    """The attention span a filled prefill chunk needs (picks its bucket)."""
    return chunk_need(m[:, 5], m[:, 6])


def plan_samples(plan: Plan, sampled: Sequence[bool]) -> bool:
    """Host-side: does any row of this round sample? (picks the step variant)"""
    return any(sampled) and any(sampled[r.request_index] for rows in plan.rows for r in rows)


class ReferenceExecutor:
    """All K explorers in this process, one after another."""

    def __init__(self, card: ModelCard, spec: ExecutorSpec) -> None:
        self.spec = spec
        b = spec.buffers
        if spec.null_step:
            from dexserve.engine.nullstep import NullRunner, NullStep

            self.packer = RowPacker(b, None)
            self.steps = [NullStep(b) for _ in range(spec.explorers)]
            self.runners = [NullRunner(w, k + 1, spec.explorers, spec.candidates, card.vocab_size, b)
                            for k, w in enumerate(spec.widths)]
            self.prefill_runners = []
        else:
            weights = load_weights(card, range(card.num_layers), need_embed=True, dtype=spec.dtype,
                                   device=spec.device, adapters=spec.adapters and spec.adapters.path)
            cos, sin = rotary_tables(card, b.max_context, dtype=spec.dtype, device=spec.device)
            self.packer = RowPacker(b, weights.dims.sliding_window)
            hidden = torch.zeros(b.hidden_rows, weights.dims.hidden, device=spec.device, dtype=spec.dtype)
            self.steps = [ExplorerStep(weights, spec.layers(k), b, cos, sin, spec.candidates,
                                       first=(k == 0), device=spec.device, dtype=spec.dtype, hidden=hidden)
                          for k in range(spec.explorers)]
            self.runners = [StepRunner(s, w, spec) for s, w in zip(self.steps, spec.widths)]
            self.prefill_runners = [StepRunner(s, b.prefill_rows, spec, prefill=True) for s in self.steps]
            warm_up(self.runners, self.prefill_runners)
        # each explorer's rows live in one array for the executor's life; the
        # step reads them through torch views of the same memory
        self.rows = [RowPacker.buffer(b, w) for w in spec.widths]
        self.filled = [0] * spec.explorers
        self.prefill_rows = RowPacker.buffer(b, b.prefill_rows)
        self.retire_rows = np.zeros((2, b.max_batch), dtype=np.int64)
        self.retire_t = torch.from_numpy(self.retire_rows)
        self.sampled = [False] * b.max_batch  # per request row: does it sample?
        self._final_logprobs: list[list[int]] | None = None
        self.step_seconds = [0.0] * spec.explorers  # wall time per explorer step (CPU: synchronous)
        self.step_calls = [0] * spec.explorers

    def set_sampling(self, index: int, params: SamplingParams) -> None:
        self.sampled[index] = not params.greedy
        for s in self.steps:
            s.set_sampling(index, params.temperature, params.top_k, params.top_p, params.seed)

    @property
    def prefill_parts(self) -> int:
        return len(self.prefill_runners) or 1   # (a null step has nothing to prefill)

    @torch.no_grad()
    def prefill(self, index: int, token_ids: Sequence[int], start: int = 0, part: int | None = None) -> None:
        """Write prompt positions start..start+len-1 to request row `index`'s KV rows.
        `part` k: only explorer k's layers of one chunk (at most P positions; part 0
        packs the chunk, the later parts read the same packed rows and the hidden
        rows part k-1 left, which no lattice round touches)."""
        P = self.spec.buffers.prefill_rows
        m, inputs = self.prefill_rows
        if part is not None:
            check_prefill_part(part, len(token_ids), self.prefill_parts, P)
            if part == 0:
                self.packer.fill_prefill(m, index, token_ids, start)
            for runner in self.prefill_runners[part:part + 1]:
                runner(inputs, sampled=False)
            settle(torch.device(self.spec.device))
            return
        for at in range(0, len(token_ids), P):
            self.packer.fill_prefill(m, index, token_ids[at:at + P], start + at)
            for runner in self.prefill_runners:
                runner(inputs, sampled=False)  # prefill readouts are not used
        settle(torch.device(self.spec.device))

    @torch.no_grad()
    def run(self, plan: Plan, logprobs: bool = False) -> Readout:
        """`logprobs`: the final explorer also reports its readout's
        log-probabilities (`final_logprobs`, one row per final-depth plan row)."""
        self.apply_retire(plan, self.steps)
        sampled = plan_samples(plan, self.sampled)
        outs = []
        last = len(plan.rows) - 1
        for k, (rows, runner) in enumerate(zip(plan.rows, self.runners)):
            if not rows:
                outs.append(None)
                continue
            m, inputs = self.rows[k]
            self.filled[k], need = self.packer.fill(m, rows, self.filled[k])
            t0 = time.perf_counter()
            outs.append(runner(inputs, sampled, runner.span(need), len(rows), logprobs and k == last))
            self.step_seconds[k] += time.perf_counter() - t0
            self.step_calls[k] += 1
        # the one host sync of the round
        host = [out[: len(rows)].tolist() if out is not None else [] for rows, out in zip(plan.rows, outs)]
        C = self.spec.candidates
        self._final_logprobs = [r[C:] for r in host[last]] if logprobs else None
        return Readout(tuple(tuple(tuple(r[:C]) for r in rows) for rows in host))

    def final_logprobs(self) -> list[list[int]] | None:
        """The last round's final-depth log-probability columns (`step.logprob_columns`),
        per final-depth plan row, when it was run with `logprobs`."""
        return self._final_logprobs

    def apply_retire(self, plan: Plan, steps: Sequence) -> None:
        if not plan.retire:
            return
        b = self.spec.buffers
        n = len(plan.retire)
        for i, r in enumerate(plan.retire):
            self.retire_rows[0, i] = b.lattice_kv_row(r.slot)
            self.retire_rows[1, i] = r.request_index * b.max_context + r.position
        if self.spec.device == "cpu":
            src, dst = self.retire_rows[0, :n], self.retire_rows[1, :n]
        else:
            src, dst = self.retire_t[0, :n].to(self.spec.device), self.retire_t[1, :n].to(self.spec.device)
        for s in steps:
            s.retire(src, dst)

    def restart(self) -> None:
        """Nothing to rebuild: stale KV rows are never visible to a new request."""

    def close(self) -> None:
        pass
