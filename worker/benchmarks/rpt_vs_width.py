"""Rounds per token against the width budget W, for K = 2, 4, 8.

For each K: one `ar` run gives the EAD oracle (it does not depend on W); then
for each W in K, 2K, 4K, ... up to 2^(K-1) (and at least 2K), `dex` (DECS on)
and `dex-nodecs` run on the same prompts. One process, one thread, prompts one
at a time; RPT is folded from the engine's round records by the same code as
`dex bench` (`dexserve.engine.measure.run_mode`, `RunStats.rpt`,
`dexserve.engine.oracle.ead_oracle`), so it does not depend on timing.

    .venv/bin/python worker/benchmarks/rpt_vs_width.py \
        --out worker/benchmarks/results/rpt-vs-width.json

prints a markdown table and writes the JSON to --out. `--append` merges a
partial rerun (say the widest W on fewer prompts) into an existing --out; such
cells carry their own config and oracle, and the table names their prompt count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def widths_for(K: int, max_width: int | None) -> list[int]:
    """K, 2K, 4K, ... up to 2^(K-1) (the DECS lattice's first-explorer width), at least 2K."""
    top = max(2 * K, 2 ** (K - 1))
    if max_width:
        top = min(top, max_width)
    out, w = [], K
    while w <= top:
        out.append(w)
        w *= 2
    return out


def measure(model: str | None, K: int, widths: list[int], prompts: list[str], max_new_tokens: int,
            policy: str) -> dict:
    from dexserve.engine.measure import run_mode
    from dexserve.engine.config import EngineConfig
    from dexserve.engine.engine import DexEngine

    row: dict = {"explorers": K, "widths": {}}
    ar_outputs = None
    for i, W in enumerate(widths):
        engine = DexEngine.load(model, EngineConfig(explorers=K, width=W, mode="ar", max_batch=1, policy=policy,
                                                 max_context=512))
        if i == 0:
            t0 = time.perf_counter()
            ar = run_mode(engine, "ar", True, prompts, max_new_tokens, with_oracle=True)
            ar_outputs = ar.outputs
            row["ar"] = {"rpt": ar.stats.rpt, "tokens": ar.tokens}
            row["ead-oracle"] = {"rpt": ar.oracle.rpt, "accept_hist": ar.oracle.accept_hist}
            print(f"[rpt] K={K} ar rpt={ar.stats.rpt} oracle={ar.oracle.rpt} ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr)
        cell = {}
        for name, decs in (("dex", True), ("dex-nodecs", False)):
            t0 = time.perf_counter()
            r = run_mode(engine, "dex", decs, prompts, max_new_tokens)
            s = r.summary(ar_outputs)
            cell[name] = {k: s[k] for k in ("rpt", "accept_hist", "fallback_rate", "wasted_node_segments",
                                            "node_segments", "mean_occupancy", "identical_to_ar")}
            print(f"[rpt] K={K} W={W} {name} rpt={s['rpt']} identical={s['identical_to_ar']} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        row["widths"][str(W)] = cell
        engine.close()
    return row


def merge(old: dict, new: dict) -> dict:
    """`new`'s measurements added to `old`'s (a partial rerun, e.g. the widest W on fewer prompts);
    each K keeps the config it was measured under."""
    by_k = {row["explorers"]: row for row in old["results"]}
    for row in new["results"]:
        row["config"] = new["config"]
        if row["explorers"] in by_k:
            base = by_k[row["explorers"]]
            for W, cell in row["widths"].items():
                # measured on other prompts: carries its own config and oracle
                cell["config"], cell["ead-oracle"] = new["config"], row["ead-oracle"]
                base["widths"][W] = cell
        else:
            by_k[row["explorers"]] = row
    return {"config": old["config"], "results": [by_k[k] for k in sorted(by_k)]}


def format_table(doc: dict) -> str:
    c = doc["config"]
    lines = [f"RPT vs width W (model {c['model']}, {c['prompts']} prompts, {c['max_new_tokens']} new tokens, "
             f"greedy, policy {c['policy']})", "",
             "| K | W | dex | dex-nodecs | EAD oracle | dex / oracle |", "|---|---|---|---|---|---|"]
    for row in doc["results"]:
        for W, cell in row["widths"].items():
            oracle = cell.get("ead-oracle", row["ead-oracle"])["rpt"]
            dex, nodecs = cell["dex"]["rpt"], cell["dex-nodecs"]["rpt"]
            cfg = cell.get("config") or row.get("config")
            note = f" ({cfg['prompts']} prompts)" if cfg else ""
            lines.append(f"| {row['explorers']} | {W}{note} | {dex} | {nodecs} | {oracle} | {dex / oracle:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from dexserve.launch.report import add_prompt_arguments, prompts_from_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_prompt_arguments(p, limit=50)
    p.add_argument("--explorers", default="2,4,8", help="comma-separated K values")
    p.add_argument("--widths", default=None, help="comma-separated W values for every K (default: K..2^(K-1))")
    p.add_argument("--max-width", type=int, default=None, help="skip widths above this")
    p.add_argument("--policy", default="priority", choices=("priority", "oldest"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--append", action="store_true",
                   help="merge into the results already in --out (same K: widths added or replaced)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    card, prompts = prompts_from_args(args)
    results = []
    for K in (int(k) for k in args.explorers.split(",")):
        widths = [int(w) for w in args.widths.split(",")] if args.widths else widths_for(K, args.max_width)
        results.append(measure(args.model, K, widths, prompts, args.max_new_tokens, args.policy))
    config = {"model": card.name, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "policy": args.policy, "executor": "reference",
              "command": " ".join(["worker/benchmarks/rpt_vs_width.py"] + (argv if argv is not None else sys.argv[1:]))}
    doc = {"config": config, "results": results}
    if args.append and args.out and Path(args.out).exists():
        doc = merge(json.loads(Path(args.out).read_text()), doc)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if args.json else format_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
