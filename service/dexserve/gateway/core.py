"""What both doors of the gateway do, whatever the transport: admit a request, follow its tokens.

The gRPC servicer (`servicer.py`) and the OpenAI-compatible HTTP door (`http_api.py`)
each convert their own wire form into the one internal request, a
`pb.GenerateRequest` (conversions at the edge), and hand it to `GatewayCore`:
`admit` validates it with the contract's checks, renders chat messages with the
model's template, checks the workers' capabilities and enqueues it; `follow` yields
its chunks, each position once. Refusals are `Rejected` with a gRPC status code,
the one status vocabulary; each door maps it to its own (gRPC status, HTTP status).

Exactly once per position: a restarted request (worker died, entry claimed)
republishes its tokens from position 0; `follow` passes on only the token whose
index is the next one this client has not seen, so every position reaches the
client once, in order, whichever attempt produced it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from dexserve.contract.chat import ChatTemplate, ChatTemplateError, Message
from dexserve.contract.model_card import ModelCard, PromptTokenizer, card_capabilities
from dexserve.contract.request import InvalidRequest
from dexserve.contract.validation import Limits, validate_capabilities, validate_request
from dexserve.gateway.observer import GatewayObserver
from dexserve.gateway.wire import BadRequest
from dexserve.queue.codec import to_generation_request, with_defaults
from dexserve.queue.protocol import STATUS_BY_VALUE
from dexserve.queue.producer import TRANSIENT, IdConflict, QueueFull, RequestQueue, Submitted
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128


class Rejected(Exception):
    """A request the gateway refuses, or a stream that ended in an error: a gRPC status code
    (both doors map it) and a message that names the field when a field is at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass
class Served:
    """The model this gateway validates for (and workers serve)."""

    card: ModelCard
    limits: Limits
    count_tokens: Callable[[str], int] | None   # None: the workers check the context
    mismatch: str | None = None                  # set while the workers' published card differs
    tokenizer: PromptTokenizer | None = None     # token ids -> text/bytes (log-probability listings)
    chat_template: ChatTemplate | None = None    # None: chat requests are refused (400 / INVALID_ARGUMENT)

    def matches(self, name: str) -> bool:
        return name in ("", self.card.name, str(self.card.path))


class GatewayCore:
    def __init__(self, queue: RequestQueue, served: Served, observer: GatewayObserver | None = None,
                 require_workers: bool = False) -> None:
        self.queue = queue
        self.served = served
        self.observer = observer or GatewayObserver()
        self.require_workers = require_workers   # no live worker: UNAVAILABLE instead of waiting in the queue
        self.draining = False        # set when the gateway stops: new requests get UNAVAILABLE

    # ---- admission -------------------------------------------------------
    async def admit(self, request: pb.GenerateRequest | BadRequest,
                    deadline_s: float | None = None) -> pb.QueuedRequest:
        """Validate, render, enqueue (or attach): the queued request. Raises `Rejected`.
        `deadline_s`: seconds the client will wait (the worker drops it after that)."""
        if isinstance(request, BadRequest):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, request.message, request.field)
        if self.draining:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry on another replica")
        if self.served.mismatch:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"gateway and workers serve different models: {self.served.mismatch}")
        if not self.served.matches(request.model):
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"model: {request.model!r} is not served here (serving {self.served.card.name!r})", "model")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: at most {MAX_REQUEST_ID_CHARS} characters",
                           "request_id")
        rid = request.request_id or uuid.uuid4().hex
        proto = with_defaults(request, rid, self.served.card.name)
        chat = len(proto.messages) > 0
        if chat:
            self._render_chat(proto)
        greq = to_generation_request(proto)
        try:
            validate_request(greq, self.served.limits, None)      # cheap checks before tokenizing
            if self.served.count_tokens is not None:
                n = await asyncio.to_thread(self.served.count_tokens, greq.prompt)
                validate_request(greq, self.served.limits, n)
            if greq.logprobs is not None or self.require_workers:
                card = await self._published_card()
                if card is None and self.require_workers:
                    raise Rejected(grpc.StatusCode.UNAVAILABLE, "no worker is running (none has published its "
                                                                "model card within the heartbeat TTL); retry later")
                if greq.logprobs is not None:
                    # no card yet (workers scaled to zero): assume yes; a worker that cannot refuses it itself
                    can = card is None or bool(card_capabilities(card).get("logprobs", False))
                    validate_capabilities(greq, logprobs=can)
        except InvalidRequest as exc:
            field = "messages" if chat and exc.field == "prompt" else exc.field
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {exc.message}", field) from exc
        qreq = pb.QueuedRequest(request_id=rid, request=proto, enqueued_unix_ms=int(time.time() * 1000))
        if deadline_s is not None:
            qreq.deadline_unix_ms = int((time.time() + deadline_s) * 1000)
        self.observer.on_enqueue(rid, False, qreq.trace_context)
        try:
            outcome = await self.queue.submit(qreq)
        except QueueFull as exc:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except IdConflict as exc:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {exc}", "request_id") from exc
        except TRANSIENT as exc:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {exc}") from exc
        if outcome is Submitted.ATTACHED:
            self.observer.on_enqueue(rid, True, qreq.trace_context)
        return qreq

    def _render_chat(self, proto: pb.GenerateRequest) -> None:
        """messages -> prompt, in place: the queue carries the text the model's template makes."""
        bad = lambda msg: Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"messages: {msg}", "messages")  # noqa: E731
        if proto.prompt:
            raise bad("give either prompt or messages, not both")
        template = self.served.chat_template
        if template is None:
            raise bad(f"model {self.served.card.name!r} has no chat template (no `chat_template` in its "
                      f"tokenizer_config.json); send a prompt instead")
        if len(proto.messages) > self.served.limits.max_chat_messages:
            raise bad(f"at most {self.served.limits.max_chat_messages} messages, got {len(proto.messages)}")
        for i, m in enumerate(proto.messages):
            if not m.role:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"messages[{i}].role: must not be empty",
                               f"messages[{i}].role")
        try:
            proto.prompt = template.render([Message(m.role, m.content) for m in proto.messages])
        except ChatTemplateError as exc:
            raise bad(str(exc)) from exc
        del proto.messages[:]

    async def _published_card(self) -> dict | None:
        """The card the live workers publish (it expires with their heartbeats); None: no worker runs."""
        try:
            raw = await self.queue.redis.get(self.queue.names.model_card())
        except TRANSIENT as exc:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {exc}") from exc
        return None if raw is None else json.loads(raw)

    # ---- streaming -------------------------------------------------------
    async def follow(self, rid: str) -> AsyncIterator[pb.GenerateChunk]:
        """The request's chunks, each position once, ending with the finish chunk. An error
        event raises `Rejected` with the worker's code. Leaving early (the caller stops
        iterating) releases this client, cancelling the request if it was the last one."""
        next_index = 0
        finished = False
        try:
            async for _entry_id, event in self.queue.events(rid):
                if event.HasField("error"):
                    finished = True
                    code = STATUS_BY_VALUE.get(event.error.code, grpc.StatusCode.UNKNOWN)
                    self.observer.on_finish(rid, code.name, next_index)
                    raise Rejected(code, event.error.message, _field_of(event.error.message, code))
                chunk = pb.GenerateChunk(request_id=rid, position=next_index,
                                         commit_unix_nanos=event.commit_unix_nanos)
                texts = []
                for tok in event.tokens:
                    if tok.index == next_index:      # earlier: already sent; later: cannot happen in order
                        chunk.token_ids.append(tok.token_id)
                        if tok.HasField("logprobs"):
                            chunk.logprobs.append(tok.logprobs)
                        texts.append(tok.text)
                        next_index += 1
                if event.HasField("finish"):
                    texts.append(event.finish.text)
                    chunk.finish_reason = event.finish.reason
                    chunk.usage.CopyFrom(event.finish.usage)
                chunk.text = "".join(texts)
                if chunk.token_ids and chunk.position == 0:
                    self.observer.on_first_token(rid, event.commit_unix_nanos)
                if chunk.token_ids or chunk.finish_reason:
                    yield chunk
                if chunk.finish_reason:
                    finished = True
                    self.observer.on_finish(rid, pb.FinishReason.Name(chunk.finish_reason), next_index)
                    return
        finally:
            if not finished:
                self.observer.on_finish(rid, "CANCELLED", next_index)
            try:
                await asyncio.shield(self.queue.release(rid, cancel=not finished))
            except Exception:  # the client is gone either way; the flag's absence only costs work
                log.warning("could not release %s", rid, exc_info=True)


def _field_of(message: str, code: grpc.StatusCode) -> str | None:
    """The field a worker's INVALID_ARGUMENT names (its messages read `field: reason`)."""
    head = message.split(":", 1)[0]
    if code is grpc.StatusCode.INVALID_ARGUMENT and head and ":" in message and \
            all(c.isalnum() or c in "_.[]" for c in head):
        return head
    return None
