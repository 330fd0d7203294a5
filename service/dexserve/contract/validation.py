"""The one place a request's fields are checked.

The gateway calls `validate_request` before enqueueing (so the client gets
INVALID_ARGUMENT naming the field); the engine calls it again before it admits
a request, since a worker may also be fed by other producers.
"""

from __future__ import annotations

import math

from dexserve.contract.limits import Limits
from dexserve.contract.request import GenerationRequest, InvalidRequest

__all__ = ["LOGPROBS_UNSUPPORTED", "Limits", "validate_capabilities", "validate_request"]

LOGPROBS_UNSUPPORTED = "not supported by this worker (its engine does not report log-probabilities)"


def validate_request(req: GenerationRequest, limits: Limits, prompt_tokens: int | None) -> None:
    """Raise InvalidRequest for the first bad field. `prompt_tokens` is the
    tokenized prompt length (None to skip the context check)."""
    if not req.request_id:
        raise InvalidRequest("request_id", "must not be empty")
    if req.prompt_ids is None and not req.prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if len(req.prompt) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"longer than {limits.max_prompt_chars} characters")
    if req.max_new_tokens < 1:
        raise InvalidRequest("max_new_tokens", f"must be at least 1, got {req.max_new_tokens}")
    if req.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest("max_new_tokens", f"at most {limits.max_new_tokens}, got {req.max_new_tokens}")
    s = req.sampling
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {s.temperature}")
    if s.temperature != 0 and not limits.min_temperature <= s.temperature <= limits.max_temperature:
        raise InvalidRequest("temperature", f"must be 0 (greedy) or in [{limits.min_temperature:g}, "
                                            f"{limits.max_temperature:g}], got {s.temperature:g}")
    if s.top_k < 0:
        raise InvalidRequest("top_k", f"must be >= 0 (0 = off), got {s.top_k}")
    if not math.isfinite(s.top_p) or not 0.0 < s.top_p <= 1.0:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {s.top_p}")
    if not 0 <= s.seed < 1 << 64:
        raise InvalidRequest("seed", f"must be in [0, 2**64), got {s.seed}")
    if len(req.stop) > limits.max_stop_strings:
        raise InvalidRequest("stop", f"at most {limits.max_stop_strings} stop strings, got {len(req.stop)}")
    for stop in req.stop:
        if not stop:
            raise InvalidRequest("stop", "stop strings must not be empty")
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest("stop", f"a stop string is longer than {limits.max_stop_chars} characters")
    if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_logprobs:
        raise InvalidRequest("logprobs", f"must be in 0..{limits.max_logprobs} (alternatives per token), "
                                         f"got {req.logprobs}")
    if prompt_tokens is not None:
        if prompt_tokens == 0:
            raise InvalidRequest("prompt", "tokenizes to zero tokens")
        if prompt_tokens + 1 > limits.max_context:
            raise InvalidRequest(
                "prompt", f"{prompt_tokens} tokens leave no room in the {limits.max_context}-token context")


def validate_capabilities(req: GenerationRequest, *, logprobs: bool) -> None:
    """Refuse what the serving engine cannot do: the worker checks its own engine
    (`EngineInfo.logprobs`), the gateway the card the workers published."""
    if req.logprobs is not None and not logprobs:
        raise InvalidRequest("logprobs", LOGPROBS_UNSUPPORTED)
