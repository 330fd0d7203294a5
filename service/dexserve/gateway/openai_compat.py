"""OpenAI's JSON <-> the gateway's one internal request and its chunks (conversions at the edge).

`completion_request` / `chat_request` turn a `/v1/completions` / `/v1/chat/completions`
body into a `pb.GenerateRequest` (what the gRPC door receives, too) plus the response
options only this door has (streaming, usage in the stream, how to list log-probabilities);
`CompletionView` / `ChatView` turn `pb.GenerateChunk`s back into OpenAI's response and
stream-chunk objects. Everything about the request itself (limits, ranges, the context,
the chat template) is checked once, by `GatewayCore.admit` with the contract's validation;
here only JSON types and the OpenAI parameters this server does not implement are refused,
each naming the parameter (`FieldError` -> 400).

Defaults are OpenAI's where they differ from the gRPC API's: temperature 1.0, and a sampled
request without a `seed` gets a random one (the same `seed` reproduces the same tokens).
`max_tokens` unset: the server's default (`Limits.default_new_tokens`).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

from dexserve.contract.model_card import PromptTokenizer
from dexserve.queue.codec import dex_usage_json, finish_reason_from_pb
from dexserve.contract.request import FinishReason
from dexserve.contract.validation import LOGPROBS_UNSUPPORTED
from dexserve.gateway.core import join_chunks
from dexserve.v1 import dex_pb2 as pb

MAX_SEED = 2**64 - 1

# The contract's field names (validation messages) as this door's parameters.
CONTRACT_TO_PARAM = {"max_new_tokens": "max_tokens"}

FINISH = {FinishReason.LENGTH: "length", FinishReason.CONTEXT: "length", FinishReason.EOS: "stop",
          FinishReason.STOP: "stop", FinishReason.CANCELLED: "cancelled"}


class FieldError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"


@dataclass
class Options:
    """How to answer: what the OpenAI request asked for beyond the internal request."""

    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None                 # None: no log-probabilities; N: N alternatives per token
    params: dict[str, str] = field(default_factory=dict)   # contract field -> the parameter the client used


# ---- JSON type checks ---------------------------------------------------------------------

def _get(body: dict, name: str, kinds: tuple[type, ...], what: str):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise FieldError(name, f"must be {what}, got {type(value).__name__} {value!r:.40}")
    return value


def _int(body: dict, name: str) -> int | None:
    """An integer the internal request holds in an int32 field (out of range: this error, not a crash)."""
    value = _get(body, name, (int,), "an integer")
    if value is not None and not -2**31 <= value < 2**31:
        raise FieldError(name, f"out of range, got {value}")
    return value


def _number(body: dict, name: str) -> float | None:
    value = _get(body, name, (int, float), "a number")
    if value is not None and not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value}")
    return None if value is None else float(value)


def _bool(body: dict, name: str) -> bool | None:
    return _get(body, name, (bool,), "true or false")


def _str(body: dict, name: str) -> str | None:
    return _get(body, name, (str,), "a string")


def _unsupported(body: dict) -> None:
    """Parameters whose non-default values this server does not implement: refused, not ignored."""
    if (n := _int(body, "n")) is not None and n != 1:
        raise FieldError("n", f"only n=1 is supported, got {n}")
    if (b := _int(body, "best_of")) is not None and b != 1:
        raise FieldError("best_of", f"only best_of=1 is supported, got {b}")
    for name in ("frequency_penalty", "presence_penalty"):
        if (v := _number(body, name)) not in (None, 0.0):
            raise FieldError(name, f"is not supported (only 0), got {v}")
    if body.get("logit_bias"):
        raise FieldError("logit_bias", "is not supported")


def _common(body: dict, req: pb.GenerateRequest, opts: Options) -> None:
    """Sampling, stop, streaming: the parameters both endpoints share."""
    _unsupported(body)
    temperature = _number(body, "temperature")
    req.temperature = 1.0 if temperature is None else temperature
    if (top_p := _number(body, "top_p")) is not None:
        req.top_p = top_p
    if (top_k := _int(body, "top_k")) is not None:        # an extension (vLLM's): 0 = off
        req.top_k = top_k
    seed = _get(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise FieldError("seed", f"must be in 0..{MAX_SEED}, got {seed}")
    req.seed = seed if seed is not None else (secrets.randbits(63) if req.temperature > 0 else 0)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise FieldError("stop", "must be a string or a list of strings")
    req.stop.extend(stop or [])
    opts.stream = bool(_bool(body, "stream"))
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise FieldError("stream_options", "must be an object")
        if not opts.stream:
            raise FieldError("stream_options", "is only allowed when stream is true")
        opts.include_usage = bool(_bool(stream_options, "include_usage"))


def _max_tokens(body: dict, req: pb.GenerateRequest, opts: Options, names: tuple[str, ...]) -> None:
    for name in names:                       # the first one given wins
        if (value := _int(body, name)) is not None:
            req.max_new_tokens = value
            opts.params["max_new_tokens"] = name
            return


def _model(body: dict) -> str:
    return _str(body, "model") or ""


# ---- requests -----------------------------------------------------------------------------

def completion_request(body: dict) -> tuple[pb.GenerateRequest, Options]:
    """A `/v1/completions` body as the internal request."""
    req = pb.GenerateRequest(model=_model(body))
    opts = Options(chat=False, model=req.model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise FieldError("prompt", "one prompt per request (a string); batches and token-id prompts "
                                   "are not supported")
    if prompt is not None and not isinstance(prompt, str):
        raise FieldError("prompt", f"must be a string, got {type(prompt).__name__}")
    req.prompt = prompt or ""
    _max_tokens(body, req, opts, ("max_tokens",))
    _common(body, req, opts)
    if _bool(body, "echo"):
        raise FieldError("echo", "is not supported")
    if _str(body, "suffix"):
        raise FieldError("suffix", "is not supported")
    if (n := _int(body, "logprobs")) is not None:
        req.logprobs = n
        opts.logprobs = n
    return req, opts


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise FieldError(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", "
                                                                "\"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise FieldError(f"messages[{i}].content", "must be a string or a list of text parts")


def chat_request(body: dict) -> tuple[pb.GenerateRequest, Options]:
    """A `/v1/chat/completions` body as the internal request (the messages form)."""
    req = pb.GenerateRequest(model=_model(body))
    opts = Options(chat=True, model=req.model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise FieldError(f"messages[{i}].role", "must be a non-empty string")
        req.messages.append(pb.ChatMessage(role=role, content=_content(m, i)))
    _max_tokens(body, req, opts, ("max_completion_tokens", "max_tokens"))
    _common(body, req, opts)
    if body.get("tools"):
        raise FieldError("tools", "tool calling is not supported")
    if (fmt := body.get("response_format")) is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise FieldError("response_format", "only {\"type\": \"text\"} is supported")
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs")
    if top is not None and not want:
        raise FieldError("top_logprobs", "needs logprobs: true")
    if want:
        req.logprobs = top or 0
        opts.logprobs = top or 0
        if top is not None:
            opts.params["logprobs"] = "top_logprobs"
    return req, opts


def param_message(field: str | None, message: str, opts: Options | None) -> tuple[str | None, str]:
    """A contract validation message (`field: reason`) in this door's parameter names."""
    if field is None:
        return None, message
    param = (opts.params.get(field) if opts else None) or CONTRACT_TO_PARAM.get(field, field)
    if message.endswith(LOGPROBS_UNSUPPORTED):
        param = field                  # about asking for log-probabilities at all, not how many
    if message.startswith(f"{field}:"):
        message = param + message[len(field):]
    return param, message


# ---- responses ----------------------------------------------------------------------------

def usage_json(usage: pb.Usage) -> dict:
    """OpenAI's usage object, plus `dex` (explorers, rounds, rpt, mode) when the worker reported it:
    an extra key, which OpenAI's clients keep (`usage.model_extra["dex"]` in the Python client)."""
    out = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if (dex := dex_usage_json(usage)) is not None:
        out["dex"] = dex
    return out


def finish_json(value: int) -> str | None:
    reason = finish_reason_from_pb(value)
    return FINISH[reason] if reason is not None else None


class _View:
    """Shared by both endpoints: ids, timestamps, token text for log-probability listings."""

    prefix = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, opts: Options, tokenizer: PromptTokenizer | None) -> None:
        self.id = f"{self.prefix}-{request_id}"
        self.model = model
        self.opts = opts
        self.tokenizer = tokenizer
        self.created = int(time.time())

    def text_of(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id) if self.tokenizer else f"<token {token_id}>"

    def bytes_of(self, token_id: int) -> list[int]:
        if self.tokenizer:
            return list(self.tokenizer.token_bytes(token_id))
        return list(self.text_of(token_id).encode())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None}

    def usage_chunk(self, usage: pb.Usage) -> dict:
        """The extra last stream chunk of `stream_options.include_usage`: no choices, the usage."""
        return {**self._envelope(self.chunk_object, []), "usage": usage_json(usage)}

    def _stream_usage(self, out: dict) -> dict:
        if self.opts.include_usage:
            out["usage"] = None
        return out


class CompletionView(_View):
    prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.offset = 0          # characters of token text listed so far (text_offset)

    def logprobs_json(self, chunk: pb.GenerateChunk) -> dict | None:
        if self.opts.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(chunk.token_ids, chunk.logprobs):
            text = self.text_of(tid)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self.text_of(t.token_id): t.logprob for t in lp.top_logprobs}
                                       if self.opts.logprobs else None)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def stream_chunk(self, chunk: pb.GenerateChunk) -> dict:
        choice = {"index": 0, "text": chunk.text, "logprobs": self.logprobs_json(chunk),
                  "finish_reason": finish_json(chunk.finish_reason)}
        return self._stream_usage(self._envelope("text_completion", [choice]))

    def response(self, chunks: list[pb.GenerateChunk]) -> dict:
        whole = join_chunks(chunks)
        choice = {"index": 0, "text": whole.text, "logprobs": self.logprobs_json(whole),
                  "finish_reason": finish_json(whole.finish_reason)}
        return {**self._envelope("text_completion", [choice]), "usage": usage_json(whole.usage)}


class ChatView(_View):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def logprobs_json(self, chunk: pb.GenerateChunk) -> dict | None:
        if self.opts.logprobs is None:
            return None
        content = []
        for tid, lp in zip(chunk.token_ids, chunk.logprobs):
            content.append({"token": self.text_of(tid), "logprob": lp.logprob, "bytes": self.bytes_of(tid),
                            "top_logprobs": [{"token": self.text_of(t.token_id), "logprob": t.logprob,
                                              "bytes": self.bytes_of(t.token_id)} for t in lp.top_logprobs]})
        return {"content": content, "refusal": None}

    def first_chunk(self) -> dict:
        """OpenAI's opening chunk: the assistant role, no content yet."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._stream_usage(self._envelope(self.chunk_object, [choice]))

    def stream_chunk(self, chunk: pb.GenerateChunk) -> dict:
        delta = {"content": chunk.text} if chunk.text or not chunk.finish_reason else {}
        choice = {"index": 0, "delta": delta, "logprobs": self.logprobs_json(chunk),
                  "finish_reason": finish_json(chunk.finish_reason)}
        return self._stream_usage(self._envelope(self.chunk_object, [choice]))

    def response(self, chunks: list[pb.GenerateChunk]) -> dict:
        whole = join_chunks(chunks)
        choice = {"index": 0, "message": {"role": "assistant", "content": whole.text, "refusal": None},
                  "logprobs": self.logprobs_json(whole), "finish_reason": finish_json(whole.finish_reason)}
        return {**self._envelope("chat.completion", [choice]), "usage": usage_json(whole.usage)}


def view(request_id: str, model: str, opts: Options, tokenizer: PromptTokenizer | None) -> _View:
    return (ChatView if opts.chat else CompletionView)(request_id, model, opts, tokenizer)
