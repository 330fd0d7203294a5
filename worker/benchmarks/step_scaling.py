"""Does an explorer step scale with its layers? (issue item 2)

Times every explorer's step for K = 1, 2, 4, 8 (segments of L/K layers) at
each width W, as the engine runs it (StepRunner: compiled by default, 1
thread), on rows that each see `--context` committed positions. Also times a
step over no layers (embedding/hidden read, masks, the hidden write-back and
the readout: the fixed part on its own), and fits

    step time = fixed + per_layer * layers

over the steps. A step of L/K layers should cost close to 1/K of the full
step: the table gives each explorer's time next to full/K.

    flock /tmp/bench.lock .venv/bin/python worker/benchmarks/step_scaling.py \\
        --out worker/benchmarks/results/step-scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dexserve.engine.executor import ExecutorSpec, RowPacker, StepRunner, even_boundaries
from dexserve.engine.model import load_weights, rotary_tables
from dexserve.contract.model_card import ModelCard
from dexserve.engine.step import BufferSpec, ExplorerStep, StepInputs, span_buckets, span_for


def rows(b: BufferSpec, width: int, context: int) -> StepInputs:
    """`width` lattice rows of request 0 at position `context`, each seeing the
    request's `context` committed rows and its own lattice row."""
    x = RowPacker.padding(b, width)
    for i in range(width):
        own = b.lattice_kv_row(i)
        x.token[i], x.position[i], x.slot[i], x.kv_row[i] = 1 + i, context, i, own
        x.request[i], x.lo[i], x.hi[i] = 0, 0, context
        x.anc[i, :] = own
    return x


def time_step(runner: StepRunner, x: StepInputs, span: int, calls: int, repeats: int) -> float:
    """Milliseconds per step: the best of `repeats` means over `calls` steps."""
    runner(x, False, span)
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            runner(x, False, span)
        best.append(1e3 * (time.perf_counter() - t0) / calls)
    return min(best)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ms = fixed + per_layer * layers."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - per * mx, per


@torch.no_grad()
def measure(model: str | None, widths: list[int], ks: list[int], context: int, max_context: int,
            compile_: bool, calls: int, repeats: int) -> dict:
    card = ModelCard.load(model)
    L = card.num_layers
    cos, sin = rotary_tables(card, max_context)
    weights = load_weights(card, range(L), need_embed=True)
    span = span_for(context, span_buckets(max_context))
    out: dict = {"config": {"model": card.name, "layers": L, "widths": widths, "ks": ks, "context": context,
                            "span": span, "compile": compile_, "threads": torch.get_num_threads()},
                 "widths": {}}
    for W in widths:
        res: dict = {"steps": {}}
        for K in sorted(set(ks) | {1}):
            if K > L:
                continue
            bounds = even_boundaries(L, K)
            b = BufferSpec(max_batch=1, max_context=max_context, lattice_slots=W, prefill_rows=1, ancestors=K)
            spec = ExecutorSpec(boundaries=bounds, buffers=b, widths=(W,) * K, candidates=max(1, K - 1),
                                compile=compile_)
            hidden = torch.zeros(b.hidden_rows, weights.dims.hidden)
            x = rows(b, W, context)
            times = []
            for k in range(K):
                layers = range(bounds[k], bounds[k + 1])
                step = ExplorerStep(weights, layers, b, cos, sin, spec.candidates, first=(k == 0), hidden=hidden)
                ms = time_step(StepRunner(step, W, spec), x, span, calls, repeats)
                times.append(round(ms, 4))
            res["steps"][f"K={K}"] = times
            print(f"[step-scaling] W={W} K={K}: {times} ms", file=sys.stderr)
        # the fixed part alone: a step over no layers (hidden read, masks, write-back, readout)
        b = BufferSpec(max_batch=1, max_context=max_context, lattice_slots=W, prefill_rows=1, ancestors=2)
        spec = ExecutorSpec(boundaries=(0, L), buffers=b, widths=(W,), candidates=1, compile=compile_)
        empty = ExplorerStep(weights, range(L, L), b, cos, sin, 1, first=False)
        res["no_layers_ms"] = round(time_step(StepRunner(empty, W, spec), rows(b, W, context), span, calls, repeats), 4)
        out["widths"][f"W={W}"] = res
    return summarize(out)


def summarize(doc: dict) -> dict:
    """Fit and ratios from the step times. The fit uses the segment steps (K >= 2)
    only: the full step's weights outgrow the CPU caches, which a repeated
    segment's do not, so the full step sits above the line (reported as
    `full_step_over_fit`)."""
    L = doc["config"]["layers"]
    for res in doc["widths"].values():
        steps = {int(k[2:]): t for k, t in res["steps"].items()}
        points = [(L // K, ms) for K, t in steps.items() if K > 1 for ms in t]
        full = steps[1][0]
        fixed, per_layer = fit(points) if len({p[0] for p in points}) > 1 else (float("nan"), float("nan"))
        res["fit"] = {"fixed_ms": round(fixed, 4), "per_layer_ms": round(per_layer, 4),
                      "fixed_share_of_full_step": round(fixed / full, 3),
                      "full_step_over_fit": round(full / (fixed + per_layer * L), 3)}
        res["vs_full_over_k"] = {f"K={K}": {"full_over_k_ms": round(full / K, 4), "slowest_ms": max(t),
                                            "slowest_over_full_over_k": round(max(t) / (full / K), 3)}
                                 for K, t in steps.items()}
    return doc


def table(doc: dict) -> str:
    c = doc["config"]
    lines = [f"model {c['model']} ({c['layers']} layers), rows see {c['context']} committed positions "
             f"(span {c['span']}), compile={c['compile']}, threads={c['threads']}", "",
             "| W | K | layers/step | each explorer's step (ms) | full/K (ms) | slowest / (full/K) |",
             "|---|---|---|---|---|---|"]
    for w, res in doc["widths"].items():
        for k, times in res["steps"].items():
            K = int(k[2:])
            v = res["vs_full_over_k"][k]
            lines.append(f"| {w[2:]} | {K} | {c['layers'] // K} | {', '.join(f'{t:.3f}' for t in times)} | "
                         f"{v['full_over_k_ms']:.3f} | {v['slowest_over_full_over_k']:.2f} |")
    lines += ["", "Fit over the segment steps (K >= 2): step ms = fixed + per_layer x layers", "",
              "| W | fixed (fit, ms) | per layer (fit, ms) | fixed / full step | full step / fit at L layers | "
              "step over no layers (ms) |", "|---|---|---|---|---|---|"]
    for w, res in doc["widths"].items():
        f = res["fit"]
        lines.append(f"| {w[2:]} | {f['fixed_ms']:.3f} | {f['per_layer_ms']:.3f} | {f['fixed_share_of_full_step']:.2f} | "
                     f"{f['full_step_over_fit']:.2f} | {res['no_layers_ms']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--widths", default="1,8")
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--context", type=int, default=60, help="committed positions each row sees")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--summarize", default=None, metavar="JSON", help="recompute the fit and table of a saved run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summarize:
        doc = summarize(json.loads(Path(args.summarize).read_text()))
        doc["markdown"] = table(doc)
        Path(args.out or args.summarize).write_text(json.dumps(doc, indent=2) + "\n")
        print(doc["markdown"])
        return
    doc = measure(args.model, [int(w) for w in args.widths.split(",")], [int(k) for k in args.ks.split(",")],
                  args.context, args.max_context, args.compile, args.calls, args.repeats)
    doc["markdown"] = table(doc)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "markdown"}, indent=2))
    print(doc["markdown"])


if __name__ == "__main__":
    main()
