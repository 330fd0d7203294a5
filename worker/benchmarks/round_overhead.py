"""What a DEX round costs besides its steps: the coordination overhead.

    flock /tmp/bench.lock .venv/bin/python worker/benchmarks/round_overhead.py \
        --out worker/benchmarks/results/round-overhead.json

Every explorer's step is the null step (`ExecutorSpec(null_step=True)`,
`dexserve.engine.nullstep`): it costs microseconds and returns scripted
readouts in the real format, so the lattice, the packing, the signalling and
the engine's own Python run exactly as in a real round (the lattice spawns,
commits at boundary 1 or 2, falls back, drops branches). What a round then
costs is the overhead a real round pays on top of its slowest step,
independent of the hardware. Runs the reference executor (one process) and the
distributed one (shared-memory transport, one process per explorer, 1 thread
each) at K=2 W=1, K=4 W=8, K=8 W=16, one request at a time, through
`DexEngine.step`, and splits a round into:

  lattice plan / lattice absorb   `Lattice.plan` / `Lattice.absorb`
  pack       rows, retire copies and header written into the payload
  signal     telling the explorers a round is there
  local      the coordinator's own explorer (null step + its bookkeeping)
  wait       until every explorer answered (their wake-up, read, null step, answer)
  decode     candidates -> `Readout`
  engine     the rest of `DexEngine.step`: records, stats, detokenization, finish checks
  step       the null steps themselves (reference: all K, inside `executor`;
             distributed: the coordinator's, inside `local`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from dexserve.engine.distributed import DistributedExecutor
from dexserve.engine.config import EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.executor import ReferenceExecutor
from dexserve.engine.tokenizer import load_tokenizer
from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import GenerationRequest

CONFIGS = ((2, 1), (4, 8), (8, 16))
TARGETS_US = {(2, 1): 200.0, (4, 8): 500.0}


def _timed(obj, name: str, acc: list[float], i: int) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[i] += time.perf_counter() - t
    setattr(obj, name, wrapper)


def measure(card: ModelCard, K: int, W: int, executor: str, rounds: int, warm: int = 200) -> dict:
    cfg = EngineConfig(explorers=K, width=W, max_batch=1, max_context=512, executor=executor, transport="shm")
    spec = dataclasses.replace(DexEngine.executor_spec(card, cfg), null_step=True)
    ex = ReferenceExecutor(card, spec) if executor == "reference" else DistributedExecutor(card, spec, threads=1)
    eng = DexEngine(card, cfg, ex, load_tokenizer(card))
    # plan, run, absorb, step (the whole round)
    acc = [0.0] * 4
    _timed(eng.lattice, "plan", acc, 0)
    _timed(eng.executor, "run", acc, 1)
    _timed(eng.lattice, "absorb", acc, 2)
    n = commits = 0
    seq = 0
    try:
        def one() -> int:
            nonlocal seq
            if not eng.active:
                seq += 1
                eng.add(GenerationRequest(f"r{seq}", prompt_ids=(seq % 1000 + 1, 7, 9), max_new_tokens=64,
                                          ignore_eos=True))
            t = time.perf_counter()
            res = eng.step()
            acc[3] += time.perf_counter() - t
            return len(res.tokens)

        for _ in range(warm):
            one()
        acc[:] = [0.0] * 4
        if executor == "reference":
            ex.step_seconds = [0.0] * K
        elif hasattr(ex, "phase_seconds"):  # (older executors have no phase timers)
            ex.phase_seconds = [0.0] * len(ex.phase_seconds)
        if executor != "reference":
            ex.local.step_seconds = 0.0
        while n < rounds:
            commits += one()
            n += 1
    finally:
        eng.close()
    us = lambda s: round(1e6 * s / n, 2)  # noqa: E731
    plan, run, absorb, total = acc
    out = {"K": K, "W": W, "executor": executor, "rounds": n, "rpt": round(n / max(1, commits), 4),
           "round_us": us(total), "lattice_plan_us": us(plan), "lattice_absorb_us": us(absorb),
           "executor_us": us(run), "engine_us": us(total - plan - run - absorb)}
    if executor == "reference":
        out["step_us"] = us(sum(ex.step_seconds))
    elif hasattr(ex, "phase_seconds"):
        from dexserve.engine.distributed.coordinator import PHASES

        out.update({f"{p}_us": us(s) for p, s in zip(PHASES, ex.phase_seconds)})
    if executor != "reference":
        out["step_us"] = us(ex.local.step_seconds)  # the coordinator's own null steps (inside `local`)
    return out


def table(doc: dict) -> str:
    cols = ["round_us", "lattice_plan_us", "lattice_absorb_us", "executor_us", "pack_us", "signal_us", "local_us",
            "wait_us", "decode_us", "step_us", "engine_us", "rpt"]
    lines = ["| executor | K | W | " + " | ".join(c.removesuffix("_us") for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in doc["runs"]:
        lines.append(f"| {r['executor']} | {r['K']} | {r['W']} | "
                     + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    lines.append("")
    lines.append("µs per round, null step (every explorer's step costs nothing); targets: "
                 + ", ".join(f"K={k} W={w} <= {t:.0f} µs" for (k, w), t in TARGETS_US.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--rounds", type=int, default=3000)
    p.add_argument("--configs", default=",".join(f"{k}x{w}" for k, w in CONFIGS), help="KxW,...")
    p.add_argument("--executors", default="reference,distributed")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median one is reported "
                   "(a shared machine has slow spells)")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    card = ModelCard.load(args.model)
    runs = []
    for c in args.configs.split(","):
        K, W = (int(x) for x in c.split("x"))
        for ex in args.executors.split(","):
            reps = sorted((measure(card, K, W, ex, args.rounds) for _ in range(args.repeats)),
                          key=lambda r: r["round_us"])
            runs.append({**reps[len(reps) // 2], "round_us_repeats": [r["round_us"] for r in reps]})
            print(f"[round_overhead] {ex} K={K} W={W}: {runs[-1]['round_us']} µs/round", file=sys.stderr)
    doc = {"config": {"model": card.name, "rounds": args.rounds, "repeats": args.repeats, "max_batch": 1, "threads": 1,
                      "transport": "shm"}, "runs": runs}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table(doc) + "\n")
    print(json.dumps(doc, indent=2) if args.json else table(doc))


if __name__ == "__main__":
    main()
