"""The `Engine` interface: what the worker loop and telemetry program against.

Two implementations satisfy it: the DEX engine (`dexserve.engine.engine.DexEngine`,
in worker/) and the stand-in (`dexserve.worker.standin.InstantEngine`, no model).
Like vLLM's scheduler interface, the loop never reaches past this protocol, so
swapping engines changes no loop code; a test checks both implementations
against it.

Driving it: `validate` a request (raises `InvalidRequest`), `add` it while
`has_capacity()`, call `step()` until every request has its `Finished`;
`cancel` ends one early. Tokens are committed in order; every `TokenEvent`
and `Finished` of a round comes back in that round's `StepResult`. The finish
decision (stop strings, EOS, length, context) is `request.finish_reason`,
shared by both implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dexserve.contract.limits import Limits
from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import Finished, GenerationRequest, StepResult


@dataclass(frozen=True)
class EngineInfo:
    """What an engine tells its observers about itself (span attributes, gauges)."""

    model: str
    engine: str = "dex"           # dex | standin
    explorers: int = 0
    executor: str = ""            # reference (one process) | distributed (one per explorer); "" for the stand-in
    mode: str = ""
    lattice_slots: int = 0
    logprobs: bool = False        # fills TokenEvent.logprob / top_logprobs when a request asks
    max_batch: int = 0            # requests decoded together (after auto sizing)
    width: int = 0                # rows per explorer per round (the widest explorer)


@runtime_checkable
class Engine(Protocol):
    card: ModelCard
    limits: Limits

    @property
    def info(self) -> EngineInfo: ...

    @property
    def active(self) -> int:
        """Requests added and not yet finished."""

    def validate(self, req: GenerationRequest) -> object:
        """Raise `InvalidRequest` naming the bad field; the request is not admitted."""

    def has_capacity(self) -> bool: ...

    def add(self, req: GenerationRequest) -> None: ...

    def cancel(self, request_id: str) -> Finished | None:
        """End a request now; None if it is not running."""

    def step(self) -> StepResult:
        """One round over every running request (raises `EngineFailure` if the executor died)."""

    def close(self) -> None: ...
