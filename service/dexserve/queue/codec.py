"""Protobuf ⇄ engine types, at the queue edge and nowhere else.

The gateway fills defaults and validates the engine form of a request; the
worker decodes the same proto into the same `GenerationRequest`. Both go
through `to_generation_request`, so they cannot disagree about a default.
"""

from __future__ import annotations

import hashlib

from dexserve.contract.limits import DEFAULT_LIMITS
from dexserve.contract.request import FinishReason, Finished, GenerationRequest, SamplingParams, TokenEvent
from dexserve.v1 import dex_pb2 as pb

_TO_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}


def finish_reason_to_pb(reason: FinishReason) -> int:
    return _TO_PB[FinishReason(reason)]


def finish_reason_from_pb(value: int) -> FinishReason | None:
    return _FROM_PB.get(value)


def finish_reason_name(value: int) -> str:
    """`FINISH_REASON_LENGTH` → `length` (what clients print)."""
    reason = _FROM_PB.get(value)
    return reason.value if reason else ""


def with_defaults(req: pb.GenerateRequest, request_id: str, model: str) -> pb.GenerateRequest:
    """A copy with every optional field explicit: what goes on the queue."""
    out = pb.GenerateRequest()
    out.CopyFrom(req)
    out.request_id = request_id
    out.model = model
    if not out.HasField("max_new_tokens"):
        out.max_new_tokens = DEFAULT_LIMITS.default_new_tokens
    if not out.HasField("top_p"):
        out.top_p = 1.0
    return out


def to_generation_request(req: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        request_id=req.request_id,
        prompt=req.prompt,
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_LIMITS.default_new_tokens,
        sampling=SamplingParams(
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p if req.HasField("top_p") else 1.0,
            seed=req.seed,
        ),
        stop=tuple(req.stop),
        logprobs=req.logprobs if req.HasField("logprobs") else None,
    )


def fingerprint(req: pb.GenerateRequest) -> bytes:
    """Identity of a request for idempotent attach: same id + same body attaches."""
    return hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest().encode()


def logprobs_message(tok: TokenEvent) -> pb.Logprobs | None:
    if tok.logprob is None:
        return None
    return pb.Logprobs(logprob=tok.logprob,
                       top_logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in tok.top_logprobs])


def token_messages(tokens: list[TokenEvent]) -> list[pb.TokenMessage]:
    return [pb.TokenMessage(index=t.index, token_id=t.token_id, text=t.text, logprobs=logprobs_message(t))
            for t in tokens]


def finish_message(fin: Finished, dex: pb.DexUsage | None = None) -> pb.FinishMessage:
    """The last event's finish; `dex`: how the worker decoded it (explorers, rounds, mode), when known."""
    return pb.FinishMessage(
        reason=finish_reason_to_pb(fin.reason),
        usage=pb.Usage(prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens, dex=dex),
        text=fin.text,
    )


def dex_usage_json(usage: pb.Usage) -> dict | None:
    """`usage.dex` as JSON (the OpenAI door's `usage.dex`, `dex generate --json`): explorers, rounds,
    rpt (rounds per committed token) and mode; None when no worker reported it."""
    if not usage.HasField("dex"):
        return None
    d = usage.dex
    rpt = d.rounds / usage.completion_tokens if usage.completion_tokens else None
    return {"explorers": d.explorers, "rounds": d.rounds, "rpt": rpt, "mode": d.mode}
