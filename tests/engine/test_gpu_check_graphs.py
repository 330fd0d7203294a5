"""gpu_check's CUDA-graph branch, exercised on the CPU: StepRunner is put in graph
mode with a stand-in for torch.cuda.CUDAGraph (capture = one eager call into
static buffers; replay = the step again on the static inputs, written into the
same static output), so the parts of worker/benchmarks/gpu_check.py that only
run with graphs (the capture census, the bare-replay timing) and the replayed
static-output path of the executor run here, not first on a GPU."""

from __future__ import annotations

import gc
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dexserve.engine.executor import RowPacker, StepRunner, row_buckets

ROOT = Path(__file__).resolve().parents[2]
def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "worker" / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class FakeGraph:
    def __init__(self, run) -> None:
        self.run, self.replays = run, 0

    def replay(self) -> None:
        self.run()
        self.replays += 1


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 1e3 * (end.t - self.t)


@pytest.fixture
def fake_graphs(monkeypatch):
    """StepRunners built with cuda_graphs=True run as graphs on the CPU."""
    init = StepRunner.__init__
    gc_states: list[tuple[bool, bool]] = []  # at each capture: (gc enabled, heap frozen)

    def graph_init(self, step, width, spec, prefill=False):
        init(self, step, width, spec, prefill)
        if spec.cuda_graphs:
            self.use_graph, self.on_host = True, False
            self.widths = row_buckets(width) if self.narrow else (width,)

    def capture(self, variant):
        sampled, span, rows, logprobs = variant
        gc_states.append((gc.isenabled(), gc.get_freeze_count() > 0))
        static_in = tuple(p.clone() for p in RowPacker.padding(self.step.spec, rows).as_tuple())

        def step():
            return self.fn(*static_in, sampled=sampled, span=span, logprobs=logprobs, prefill=self.prefill)
        static_out = step().clone()
        return FakeGraph(lambda: static_out.copy_(step())), static_in, static_out

    monkeypatch.setattr(StepRunner, "__init__", graph_init)
    monkeypatch.setattr(StepRunner, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return gc_states


def test_graph_branch_census_replay_and_equality(fake_graphs):
    gc = _gpu_check()
    args = SimpleNamespace(model=None, width=8, max_context=64, device="cpu")
    prompts = [[5, 17, 42, 7, 99, 3], [11, 12, 13]]
    eng, _ = gc.load_engine(args, 2, graphs=True)
    eager, _ = gc.load_engine(args, 2, graphs=False)
    try:
        census = gc.graph_census(eng)
        assert census["use_graph"] and census["every_step_captured"], census
        assert census["lattice_graphs"] == [2 * len(census["span_buckets"]) * len(row_buckets(8))] * 2
        assert not gc.graph_census(eager)["every_step_captured"]
        # replayed static outputs == eager, token for token and round for round
        for mode in ("ar", "dex"):
            g = gc.decode(eng, mode, prompts, 10, readouts=True)
            e = gc.decode(eager, mode, prompts, 10, readouts=True)
            assert g.outputs == e.outputs and g.readouts == e.readouts, mode
        span = eng.executor.runners[0].span(16)
        before = [gc.greedy_graph(r, span).replays for r in eng.executor.runners]
        us = gc.replay_only_us(eng, span, 2)
        assert len(us) == 2
        assert [gc.greedy_graph(r, span).replays - b for r, b in zip(eng.executor.runners, before)] == [5, 5]
        assert len(gc.isolated_step_us(eng, span, 2)) == 2
    finally:
        eng.close()
        eager.close()


def test_captures_run_with_the_heap_frozen_and_gc_off(fake_graphs):
    """torch < 2.9 calls gc.collect() at every capture: warm-up freezes the heap
    (and pauses automatic collection) while it captures, and restores both."""
    gc_was = gc.isenabled()
    gc_mod = _gpu_check()
    eng, _ = gc_mod.load_engine(SimpleNamespace(model=None, width=2, max_context=64, device="cpu"), 2, graphs=True)
    eng.close()
    assert fake_graphs and set(fake_graphs) == {(False, True)}
    assert gc.isenabled() == gc_was and gc.get_freeze_count() == 0
