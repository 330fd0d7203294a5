"""What a caller hands the engine and what it gets back, independent of transport.

The gateway validates against the same limits (`Engine.validate`), the worker
maps queue messages to `GenerationRequest`, and the engine answers with
`TokenEvent`s and one `Finished` per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from dexserve.contract.limits import DEFAULT_LIMITS
from dexserve.contract.records import RoundRecord


class FinishReason(str, Enum):
    LENGTH = "length"      # max_new_tokens reached
    EOS = "eos"            # the model emitted its end-of-sequence token
    STOP = "stop"          # a stop string appeared in the text
    CANCELLED = "cancelled"
    CONTEXT = "context"    # the context window is full


def finish_reason(*, stopped: bool, eos: bool, generated: int, max_new_tokens: int, prompt_tokens: int,
                  max_context: int) -> FinishReason | None:
    """The one finish decision, after a token commits (every engine calls this).

    Precedence: a stop string in the text, then the end-of-sequence token, then
    the request's length, then the context window. `eos` is False when the
    request ignores EOS. None: the request goes on.
    """
    if stopped:
        return FinishReason.STOP
    if eos:
        return FinishReason.EOS
    if generated >= max_new_tokens:
        return FinishReason.LENGTH
    if prompt_tokens + generated >= max_context:
        return FinishReason.CONTEXT
    return None


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. Noise is drawn per (seed, position), so a
    request with the same seed reproduces its tokens exactly, on any worker."""

    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str = ""
    max_new_tokens: int = DEFAULT_LIMITS.default_new_tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    prompt_ids: tuple[int, ...] | None = None  # when set, used instead of tokenizing `prompt`
    ignore_eos: bool = False
    # None: no log-probabilities; N (0..Limits.max_logprobs): every committed token's log-probability
    # and the N most likely alternatives at its position (`TokenEvent.logprob` / `top_logprobs`).
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One committed token. `index` counts generated tokens from 0; `text` is the
    text delta it releases (possibly empty while a stop string or a UTF-8
    sequence is still incomplete).

    When the request asked for `logprobs`, `logprob` is the token's natural-log
    probability under the distribution it was committed from (the final-depth
    readout: exactly `ar`'s) and `top_logprobs` the request's number of most
    likely `(token_id, logprob)` pairs there, best first; otherwise None / ()."""

    request_id: str
    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # the trailing text released at finish (held-back text, if any)


@dataclass
class StepResult:
    """What one engine step (one lattice round) produced."""

    record: RoundRecord | None
    tokens: list[TokenEvent] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


class InvalidRequest(ValueError):
    """A request the engine cannot run. `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EngineFailure(RuntimeError):
    """The executor failed; the listed requests are lost (their clients get an
    error) and the engine has already restarted its executor for new work."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids
