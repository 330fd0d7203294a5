"""Which engine a worker runs: `dex` (the real one) or `standin`.

The worker and the tests take the engine through this factory, so a test
chooses with one string and the loop never imports torch for the stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineChoice:
    kind: str = "dex"                  # "dex" | "standin"
    model_dir: str | None = None       # None = the shipped model
    explorers: int = 4
    width: int = 8
    mode: str = "dex"
    max_context: int = 512
    max_new_tokens: int = 1024
    max_batch: int = 4
    executor: str = "reference"
    compile: bool = False
    standin_delay_s: float = 0.0
    standin_poison: str | None = None


@dataclass
class StandinConfig:
    """The EngineConfig fields the stand-in reads."""

    max_context: int = 512
    max_batch: int = 4
    max_new_tokens: int = 1024


def make_engine(choice: EngineChoice):
    if choice.kind == "standin":
        from dexserve.worker.standin import InstantEngine

        return InstantEngine.load(choice.model_dir, StandinConfig(choice.max_context, choice.max_batch, choice.max_new_tokens),
                                  step_delay_s=choice.standin_delay_s, poison=choice.standin_poison)
    if choice.kind == "dex":
        from dexserve.engine.engine import Engine, EngineConfig

        config = EngineConfig(explorers=choice.explorers, width=choice.width, mode=choice.mode,
                              max_context=choice.max_context, max_batch=choice.max_batch,
                              max_new_tokens=choice.max_new_tokens,
                              compile=choice.compile, executor=choice.executor)
        return Engine.load(choice.model_dir, config)
    raise ValueError(f"unknown engine {choice.kind!r} (dex | standin)")
