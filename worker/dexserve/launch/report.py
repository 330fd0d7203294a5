"""CLI-edge helpers shared by `dex bench` and the scripts in worker/benchmarks:
prompt flags → prompts, and printing/writing a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from dexserve.contract.model_card import ModelCard
from dexserve.engine.measure import load_prompts


def add_prompt_arguments(p: argparse.ArgumentParser, limit: int | None = 50, model: bool = True) -> None:
    """--model (unless the engine flags already define it), --prompts, --limit, --max-new-tokens."""
    if model:
        p.add_argument("--model", default=None, help="local checkpoint directory (default: the shipped model)")
    p.add_argument("--prompts", default=None,
                   help="JSONL file, one {\"prompt\": ...} per line (default: the model's held-out prompts)")
    p.add_argument("--limit", type=int, default=limit, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)


def prompts_from_args(args: argparse.Namespace) -> tuple[ModelCard, list[str]]:
    card = ModelCard.load(args.model)
    return card, load_prompts(args.prompts or card.path / "heldout_prompts.jsonl", args.limit)


def emit(doc: dict, out: str | None, as_json: bool, table: Callable[[dict], str]) -> None:
    """Write the report to --out, then print it as JSON or as a table."""
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if as_json else table(doc))
