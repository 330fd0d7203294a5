"""Which engine a worker runs: `dex` (the real one) or `standin`.

The worker and the tests take the engine through this factory, so a test
chooses with one string and the loop never imports torch for the stand-in.
The real engine's flags are `dexserve.commands.engine_options`, shared with
`dex generate`, `dex bench` and `dex up`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class StandinConfig:
    """The EngineConfig fields the stand-in reads."""

    max_context: int = 512
    max_batch: int = 4
    max_new_tokens: int = 1024


def make_engine(args: argparse.Namespace):
    if args.engine == "standin":
        from dexserve.worker.standin import InstantEngine

        return InstantEngine.load(args.model, StandinConfig(args.max_context, args.max_batch, args.max_new_tokens_limit),
                                  step_delay_s=args.standin_delay, poison=args.standin_poison)
    if args.engine == "dex":
        from dexserve.commands.engine_options import engine_config
        from dexserve.engine.engine import Engine

        return Engine.load(args.model, engine_config(args))
    raise ValueError(f"unknown engine {args.engine!r} (dex | standin)")
