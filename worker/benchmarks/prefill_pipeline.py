"""Prompt prefill: one process against explorers in their own processes.

    flock /tmp/bench.lock .venv/bin/python worker/benchmarks/prefill_pipeline.py \\
        --out worker/benchmarks/results/prefill-pipeline.json

Times `executor.prefill` on the held-out prompts for the reference executor
(K explorers one after another in one process: the whole model per chunk) and
the distributed one (one process per explorer, shared memory, 1 thread each),
whose explorers pipeline a prompt's chunks: explorer k works on chunk c while
explorer k+1 works on chunk c-1. Passes take turns; the median pass is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dexserve.contract.request import GenerationRequest
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.measure import load_prompts
from dexserve.contract.model_card import ModelCard

EXECUTORS = ("reference", "distributed")


def measure(model: str | None, K: int, chunk: int, limit: int, passes: int, compile_: bool) -> dict:
    card = ModelCard.load(model)
    prompts = load_prompts(card.path / "heldout_prompts.jsonl", limit)
    engines = {ex: DexEngine.load(model, EngineConfig(explorers=K, width=1, max_batch=1, executor=ex,
                                                      compile=compile_, threads=1, prefill_chunk=chunk))
               for ex in EXECUTORS}
    try:
        ids = [engines["reference"].encode(GenerationRequest(request_id=f"p{i}", prompt=p))
               for i, p in enumerate(prompts)]
        for eng in engines.values():  # warm-up outside the measurement
            eng.executor.prefill(0, ids[0])
        ms: dict[str, list[float]] = {ex: [] for ex in EXECUTORS}
        for _ in range(passes):
            for ex, eng in engines.items():
                t0 = time.perf_counter()
                for x in ids:
                    eng.executor.prefill(0, x)
                ms[ex].append(1e3 * (time.perf_counter() - t0) / len(ids))
    finally:
        for eng in engines.values():
            eng.close()
    med = {ex: statistics.median(v) for ex, v in ms.items()}
    return {"config": {"model": card.name, "explorers": K, "prefill_chunk": chunk, "prompts": len(ids),
                       "mean_prompt_tokens": round(sum(map(len, ids)) / len(ids), 1), "passes": passes,
                       "compile": compile_, "threads": 1},
            "ms_per_prompt": {ex: round(v, 3) for ex, v in med.items()},
            "ms_per_prompt_passes": {ex: [round(x, 3) for x in v] for ex, v in ms.items()},
            "distributed_over_reference": round(med["distributed"] / med["reference"], 3)}


def table(doc: dict) -> str:
    c = doc["config"]
    return "\n".join([
        f"prefill of {c['prompts']} held-out prompts ({c['mean_prompt_tokens']} tokens on average), K={c['explorers']}, "
        f"chunks of {c['prefill_chunk']}, compile={c['compile']}, 1 thread per process; median of {c['passes']} passes",
        "", "| executor | ms per prompt | passes |", "|---|---|---|",
        *[f"| {ex} | {doc['ms_per_prompt'][ex]} | {' '.join(map(str, doc['ms_per_prompt_passes'][ex]))} |"
          for ex in EXECUTORS],
        "", f"distributed / reference = {doc['distributed_over_reference']}"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--explorers", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    doc = measure(args.model, args.explorers, args.prefill_chunk, args.limit, args.passes, args.compile)
    print(json.dumps(doc, indent=2))
    print(table(doc), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
