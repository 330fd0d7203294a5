"""Per-depth agreement of a model's early readouts with its final token.

    python worker/benchmarks/agreement.py --limit 50 --max-new-tokens 64

Decodes held-out prompts greedily in `ar` mode with one explorer per layer
(K = L), so every layer is a boundary, and folds the round records with the
EAD oracle (engine/oracle.py, as `dex bench` does): for each committed token,
did the readout at depth d of its predecessor already equal it? This is the
free-running agreement that bounds what DEX can accept at each boundary.
"""

from __future__ import annotations

import argparse
import json

import torch

from dexserve.launch.report import add_prompt_arguments, prompts_from_args
from dexserve.engine.engine import DexEngine, EngineConfig
from dexserve.contract.model_card import ModelCard
from dexserve.engine.measure import run_mode


def agreement(model: str | None, prompts: list[str], max_new_tokens: int) -> dict:
    """The EAD oracle's per-boundary agreement (the fold `dex bench` reports) at K = L: every layer a boundary."""
    card = ModelCard.load(model)
    L = card.num_layers
    eng = DexEngine.load(model, EngineConfig(explorers=L, width=1, mode="ar", max_batch=1, max_context=512))
    oracle = run_mode(eng, "ar", True, prompts, max_new_tokens, with_oracle=True).oracle
    eng.close()
    # the final depth's readout is the committed token itself
    return {"model": card.name, "tokens": oracle.commits, "prompts": len(prompts),
            "agreement_by_depth": {**oracle.agreement, str(L): 1.0}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _card, prompts = prompts_from_args(args)
    out = agreement(args.model, prompts, args.max_new_tokens)
    print(json.dumps(out))
    print("| depth | " + " | ".join(out["agreement_by_depth"]) + " |")
    print("|---|" + "---|" * len(out["agreement_by_depth"]))
    print("| agreement | " + " | ".join(str(v) for v in out["agreement_by_depth"].values()) + " |")


if __name__ == "__main__":
    main()
