"""Boundary adapters on a standard checkpoint: agreement and dex RPT before/after.

A *standard* checkpoint is the shipped model's architecture, size and corpus
trained WITHOUT the early-exit loss (the kind of model users bring):

    python -m dexserve.training.train_early_exit --out runs/dexcode-6m-standard --no-early-exit \\
        --minutes 18 --steps 1400 --threads 1

Its adapters are trained with `dex train-adapter` on the same domain's
training split (the stdlib files `corpus.split` does not hold out; held-out
files are chosen by the same path hash, so evaluation prompts come from files
neither the model nor the adapters saw):

    python worker/benchmarks/adapters.py corpus --out runs/bench/stdlib-train.jsonl
    dex train-adapter --model runs/dexcode-6m-standard --data runs/bench/stdlib-train.jsonl \\
        --explorers 8 --minutes 10 --lr 1e-2 --threads 2 --out runs/bench/full/dex_adapters.safetensors

or on the model's own outputs: `dex train-adapter --self-generate N` continues
windows of the same split with the model itself (greedy; here up to 3 of the 10
minutes, --generate-share 0.3) and trains on those continuations:

    dex train-adapter --model runs/dexcode-6m-standard --data runs/bench/stdlib-train.jsonl \\
        --self-generate 100000 --explorers 8 --minutes 10 --lr 1e-2 --threads 2 \\
        --out runs/bench/selfgen/dex_adapters.safetensors

Then this script decodes held-out prompts (the standard checkpoint's
heldout_prompts.jsonl) greedily with: the standard model and no adapters, the
standard model with each adapter file given, and the shipped early-exit model
(the ceiling adapters chase: same architecture trained with the early-exit
loss). Per configuration: free-running agreement of every layer's readout with
the committed token (an `ar` run at K = L, folded from its records like the
EAD oracle), and dex RPT / tokens/s at K = 2, 4, 8, each checked token for
token against `ar`. Steps run eager: RPT does not depend on compilation.

    python worker/benchmarks/adapters.py run --standard runs/dexcode-6m-standard \\
        --adapters full=runs/bench/full/dex_adapters.safetensors --limit 16 --max-new-tokens 48 \\
        --out worker/benchmarks/results/adapters.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from dexserve.contract.model_card import ModelCard, shipped_model_dir
from dexserve.engine.adapters import AdapterCard, card_path
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.engine.measure import load_prompts, run_mode

KS = (2, 4, 8)


def write_corpus(out: Path, seed: int = 0) -> dict:
    """The training split of the shipped corpus as JSONL (one file per line, shuffled)."""
    from dexserve.training.corpus import split, stdlib_files

    train, held = split(stdlib_files())
    random.Random(seed).shuffle(train)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for f in train:
            fh.write(json.dumps({"text": f.text}) + "\n")
    return {"train_files": len(train), "heldout_files": len(held), "out": str(out)}


def measure(model: str, adapters: str, prompts: list[str], new: int, width: int, ks: tuple[int, ...]) -> dict:
    L = ModelCard.load(model).num_layers
    cfg = dict(width=width, max_batch=1, max_context=512, compile=False, adapters=adapters)
    eng = DexEngine.load(model, EngineConfig(explorers=L, mode="ar", **cfg))
    ar = run_mode(eng, "ar", True, prompts, new, with_oracle=True)
    out = {"adapters": eng.adapters.as_dict() if eng.adapters else None,
           "agreement_by_depth": ar.oracle.agreement, "ar_tokens": ar.tokens, "by_k": {}}
    eng.close()
    for K in ks:
        eng = DexEngine.load(model, EngineConfig(explorers=K, mode="dex", **cfg))
        run_mode(eng, "dex", True, prompts[:1], 4)   # warm-up
        r = run_mode(eng, "dex", True, prompts, new)
        s = r.summary(ar.outputs)
        out["by_k"][str(K)] = {k: s[k] for k in ("rpt", "tokens_per_s", "fallback_rate", "accept_hist",
                                                 "identical_to_ar")}
        eng.close()
        print(f"[adapters] {Path(model).name} adapters={adapters} K={K}: rpt={s['rpt']} "
              f"identical={s['identical_to_ar']}", file=sys.stderr, flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.prompts or Path(args.standard) / "heldout_prompts.jsonl", args.limit)
    configs = {"standard": (args.standard, "none")}
    for spec in args.adapters:
        name, _, path = spec.partition("=")
        configs[f"standard+{name}"] = (args.standard, path)
    configs["shipped-early-exit"] = (str(shipped_model_dir()), "none")
    ks = tuple(int(k) for k in args.ks.split(","))
    results = {name: measure(model, ad, prompts, args.max_new_tokens, args.width, ks)
               for name, (model, ad) in configs.items()}
    training = {}
    for name, (_model, ad) in configs.items():
        if ad != "none":
            c = AdapterCard.read(card_path(Path(ad)))
            training[name] = {"rank": c.rank, "steps": c.steps, "training_seconds": c.training_seconds,
                              "data_tokens": c.data_tokens, "heldout_agreement_before": c.heldout_agreement_before,
                              "heldout_agreement": c.heldout_agreement, "settings": c.settings,
                              "data_source": c.data_source, "self_generated": c.self_generated}
    base = results["standard"]["by_k"]
    for name, r in results.items():
        r["rpt_reduction_vs_standard"] = {k: round(1 - r["by_k"][k]["rpt"] / base[k]["rpt"], 4) for k in base}
    summary_file = Path(args.standard) / "training_summary.json"
    standard = {"path": args.standard}
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        standard |= {"steps": summary["total_steps"], "minutes": summary["total_minutes"],
                     "val_loss_per_depth": summary["val_loss_per_depth"], "args": summary["args"]}
    return {"config": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "width": args.width,
                       "threads": args.threads, "compile": False, "ks": list(ks), "standard_model": standard},
            "adapter_training": training, "results": results}


def table(doc: dict) -> str:
    res = doc["results"]
    ks = doc["config"]["ks"]
    names = list(res)
    lines = ["| config | " + " | ".join(f"RPT K={k}" for k in ks) + " | " + " | ".join(f"tok/s K={k}" for k in ks)
             + " | RPT vs standard | identical to ar |", "|---|" + "---|" * (2 * len(ks) + 2)]
    for n in names:
        r = res[n]
        lines.append(f"| {n} | " + " | ".join(str(r["by_k"][str(k)]["rpt"]) for k in ks) + " | "
                     + " | ".join(str(r["by_k"][str(k)]["tokens_per_s"]) for k in ks) + " | "
                     + " ".join(f"K={k}: {-100 * r['rpt_reduction_vs_standard'][str(k)]:+.1f}%" for k in ks) + " | "
                     + str(all(r["by_k"][str(k)]["identical_to_ar"] for k in ks)) + " |")
    depths = list(res[names[0]]["agreement_by_depth"])
    lines += ["", "free-running agreement with the committed token, by depth:",
              "| config | " + " | ".join(depths) + " |", "|---|" + "---|" * len(depths)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in res[n]["agreement_by_depth"].values()) + " |")
    for n, t in doc["adapter_training"].items():
        gen = t.get("self_generated") or {}
        lines.append(f"\n{n}: rank={t['rank']} steps={t['steps']} training {t['training_seconds']:.0f} s, "
                     f"{t['data_tokens']} tokens"
                     + (f"; data self-generated: {gen['rows']} rows in {gen['seconds']:.0f} s" if gen else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write the stdlib training split as JSONL")
    c.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="measure")
    r.add_argument("--standard", required=True, help="the standard (no early-exit loss) checkpoint")
    r.add_argument("--adapters", action="append", default=[], help="NAME=PATH of an adapter file (repeatable)")
    r.add_argument("--prompts", default=None)
    r.add_argument("--limit", type=int, default=16)
    r.add_argument("--max-new-tokens", type=int, default=48)
    r.add_argument("--width", type=int, default=8)
    r.add_argument("--ks", default=",".join(map(str, KS)), help="explorer counts K to measure dex at")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default=None)
    r.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "corpus":
        print(json.dumps(write_corpus(args.out)))
        return
    t0 = time.time()
    doc = run(args)
    doc["config"]["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if args.json else table(doc))


if __name__ == "__main__":
    main()
