"""Running streams while a long prompt is admitted: inter-token latency before
and after chunked prefill.

    flock /tmp/bench.lock .venv/bin/python worker/benchmarks/prefill_itl.py \\
        --out worker/benchmarks/results/prefill-itl.json

Four streams decode (held-out prompts, greedy, one engine with the worker's
default settings: the auto layout, W=8, compiled steps; `--explorers 4` for the
K=4 engine in one process that was the default before). After a few rounds a fifth request
arrives with a 2,000-token prompt. For each setting the script records when
every token of the four streams commits and reports their inter-token gaps
over the whole run (p50, p99, worst, worst / median) and the long request's
time to first token, and the worst gap while the long prompt is admitted
(from its arrival to its first token):

- `prefill_share 0`: the prompt is prefilled whole before the next round (the
  old behaviour: every running stream waits for all of it);
- `prefill_share 1` (the default): chunks between rounds, a part at a time
  (explorer k's layers of a chunk in part k), on average one round's time of
  prefill per round (a part dearer than a round waits for credit and runs alone).

A third setting runs the four streams with no long prompt at all: the gaps
DEX streams have by themselves (a token whose proposal was refused takes
several rounds), against which the others compare. Passes take turns; the
first pass of each setting only warms up (compiles); the median of the others
is reported. The four streams' tokens are compared across settings and must be
identical.

The shipped model has 1,024 positions. For a 2,000-token prompt the script
runs its weights with `max_position_embeddings` raised (a copy of its
config.json beside links to its files): the cost of each step is what matters
here, not what the model says past its trained length. `--model` takes any
local checkpoint with enough positions as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import GenerationRequest
from dexserve.engine.config import EXECUTORS, EngineConfig
from dexserve.engine.engine import DexEngine
from dexserve.engine.measure import load_prompts

STREAMS = 4


def long_context_copy(card: ModelCard, positions: int, into: Path) -> str:
    """The checkpoint as it is if it has `positions`; otherwise links to its files
    beside a config.json with max_position_embeddings raised."""
    if card.max_position_embeddings >= positions:
        return str(card.path)
    for f in card.path.iterdir():
        if f.name != "config.json":
            (into / f.name).symlink_to(f.resolve())
    cfg = json.loads((card.path / "config.json").read_text())
    cfg["max_position_embeddings"] = positions
    (into / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(into)


def long_prompt(eng: DexEngine, texts: list[str], tokens: int) -> tuple[int, ...]:
    """`tokens` prompt ids: the held-out prompts' text, repeated as needed."""
    ids: list[int] = []
    while len(ids) < tokens:
        for t in texts:
            ids += eng.encode(GenerationRequest("x", prompt=t + "\n"))
    return tuple(ids[:tokens])


def scenario(eng: DexEngine, prompts: list[str], long_ids: tuple[int, ...] | None, new: int, lead: int) -> dict:
    """Four streams; after `lead` rounds the long request arrives (none: the baseline).
    Returns each stream's commit times and tokens, and the long request's TTFT."""
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(STREAMS)}
    tokens: dict[str, list[int]] = {rid: [] for rid in times}
    for i, rid in enumerate(times):
        eng.add(GenerationRequest(rid, prompt=prompts[i % len(prompts)], max_new_tokens=new, ignore_eos=True))
    rounds, admitted, ttft = 0, None, None
    while eng.active:
        if rounds == lead and long_ids:
            admitted = time.perf_counter()
            eng.add(GenerationRequest("long", prompt_ids=long_ids, max_new_tokens=8, ignore_eos=True))
        res = eng.step()
        now = time.perf_counter()
        rounds += 1
        for ev in res.tokens:
            if ev.request_id in times:
                times[ev.request_id].append(now)
                tokens[ev.request_id].append(ev.token_id)
            elif ttft is None:
                ttft = now - admitted
    window = (admitted, admitted + ttft) if ttft is not None else None
    return {"times": times, "tokens": tokens, "ttft_s": ttft, "window": window}


def gaps_of(run: dict, window: tuple[float, float] | None = None) -> list[float]:
    """Every stream's inter-token gaps (those that overlap `window` when given)."""
    return [b - a for ts in run["times"].values() for a, b in zip(ts, ts[1:])
            if window is None or (b > window[0] and a < window[1])]


def summary(run: dict) -> dict:
    """Gaps over the whole run, and the worst gap while the long prompt was admitted (from
    its arrival to its first token: the prefill the running streams share their rounds with)."""
    gaps = sorted(gaps_of(run))
    p50 = statistics.median(gaps)
    during = gaps_of(run, run["window"]) if run["window"] else []
    worst = max(during) if during else None
    return {"itl_p50_ms": round(1e3 * p50, 3),
            "itl_p99_ms": round(1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 3),
            "worst_gap_ms": round(1e3 * gaps[-1], 3), "worst_over_median": round(gaps[-1] / p50, 2),
            "worst_gap_admitting_ms": round(1e3 * worst, 3) if worst else None,
            "worst_admitting_over_median": round(worst / p50, 2) if worst else None,
            "long_ttft_ms": round(1e3 * run["ttft_s"], 1) if run["ttft_s"] is not None else None}


def measure(args) -> dict:
    card = ModelCard.load(args.model)
    prompts = load_prompts(card.path / "heldout_prompts.jsonl", STREAMS)
    context = args.prompt_tokens + 8 + 64
    # (setting name, prefill_share, whether the long prompt arrives)
    settings = [("no long prompt", args.share, False), ("prefill_share=0", 0.0, True),
                (f"prefill_share={args.share:g}", args.share, True)]
    with tempfile.TemporaryDirectory() as tmp:
        model = long_context_copy(card, context, Path(tmp))
        engines = {share: DexEngine.load(model, EngineConfig(
            explorers=args.explorers, executor=args.executor, mode=args.mode, max_batch=STREAMS + 1,
            max_context=context, compile=args.compile, prefill_share=share,
            prefill_chunk=args.prefill_chunk)) for share in {0.0, args.share}}
        try:
            long_ids = long_prompt(engines[0.0], prompts, args.prompt_tokens)
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
            for p in range(args.passes + 1):        # pass 0 warms up (compiles every span bucket)
                for name, share, arrives in settings:
                    run = scenario(engines[share], prompts, long_ids if arrives else None, args.new_tokens,
                                   args.lead_rounds)
                    if p:
                        runs[name].append(run)
            info = engines[0.0].info
        finally:
            for eng in engines.values():
                eng.close()
    first = runs[settings[0][0]][0]["tokens"]
    same = all(r["tokens"] == first for rs in runs.values() for r in rs)
    result = {}
    for name, rs in runs.items():
        sums = [summary(r) for r in rs]
        result[name] = {k: statistics.median(x[k] for x in sums) if sums[0][k] is not None else None
                        for k in sums[0]} | {"passes": sums}
    return {"config": {"model": card.name, "positions": context, "explorers": info.explorers,
                       "executor": info.executor, "width": info.width, "mode": args.mode, "streams": STREAMS,
                       "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                       "lead_rounds": args.lead_rounds, "prefill_chunk": args.prefill_chunk,
                       "compile": args.compile, "passes": args.passes},
            "settings": result, "streams_identical_across_settings": same}


def table(doc: dict) -> str:
    c = doc["config"]
    rows = ["| setting | ITL p50 ms | ITL p99 ms | worst gap ms | worst / median | worst gap while admitting ms | "
            "that / median | long prompt TTFT ms |", "|---|---|---|---|---|---|---|---|"]
    for name, r in doc["settings"].items():
        rows.append(f"| {name} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['worst_gap_ms']} | "
                    f"{r['worst_over_median']} | {r['worst_gap_admitting_ms'] or '-'} | "
                    f"{r['worst_admitting_over_median'] or '-'} | {r['long_ttft_ms'] or '-'} |")
    return "\n".join([
        f"{c['streams']} streams of {c['model']} (K={c['explorers']} {c.get('executor', 'reference')}, "
        f"W={c['width']}, {c['mode']}, compile="
        f"{c['compile']}) while a {c['prompt_tokens']}-token prompt is admitted after {c['lead_rounds']} rounds; "
        f"chunks of {c['prefill_chunk']}; median of {c['passes']} passes", "", *rows, "",
        f"streams identical across settings: {doc['streams_identical_across_settings']}"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--new-tokens", type=int, default=160, help="tokens each running stream generates")
    p.add_argument("--lead-rounds", type=int, default=20, help="rounds before the long prompt arrives")
    p.add_argument("--share", type=float, default=EngineConfig.prefill_share)
    p.add_argument("--mode", default=EngineConfig.mode, help="dex (default) or ar: ar's streams commit evenly "
                   "(no collapses), so their gaps show the prefill alone")
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    p.add_argument("--explorers", "-K", type=int, default=EngineConfig.explorers,
                   help="depth explorers (default 0: the engine's auto layout, as a worker with default flags)")
    p.add_argument("--executor", default=EngineConfig.executor, choices=EXECUTORS)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    doc = measure(args)
    print(json.dumps(doc, indent=2))
    print(table(doc), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if not doc["streams_identical_across_settings"]:
        sys.exit("the running streams' tokens differ between settings")


if __name__ == "__main__":
    main()
