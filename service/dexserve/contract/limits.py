"""The serving limits: one definition for the gateway and every worker.

Both roles build their `Limits` at the CLI edge from the same flags and
environment (`DEX_MAX_CONTEXT`, `DEX_MAX_NEW_TOKENS`; see
`dexserve.commands.options`), so a deployment that sets them once (the Helm
chart sets both roles from one value) validates the same way at the gateway
and in the engine. Nothing else in the code base writes these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_context: int = 512            # positions per request: prompt tokens + generated tokens
    max_new_tokens: int = 1024        # the largest max_new_tokens a request may ask for
    default_new_tokens: int = 64      # max_new_tokens of a request that sets none
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_prompt_chars: int = 200_000
    # A sampled request's temperature (0 = greedy). The engine samples in float32: a temperature
    # above float32's range failed inside the engine, and one near 0 divides the logits to inf
    # (NaN scores); between these bounds every value is exact and finite.
    min_temperature: float = 0.01
    max_temperature: float = 100.0
    max_logprobs: int = 20            # alternatives per token a request may ask for (`logprobs`)
    max_chat_messages: int = 512      # messages in one chat request

    def __post_init__(self) -> None:
        if self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        if not 1 <= self.default_new_tokens <= self.max_new_tokens:
            raise ValueError(f"default_new_tokens must be in 1..max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.default_new_tokens}")


DEFAULT_LIMITS = Limits()
