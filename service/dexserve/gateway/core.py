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
client once, in order, whichever attempt produced it. It is verified: a restarted
attempt's token at a position already sent must equal the one sent, or the stream
ends with ABORTED (never a splice of two answers).

Also shared by both doors: the stream limit (`stream_slot`, RESOURCE_EXHAUSTED past
`max_streams`), drain (`drain`: new requests UNAVAILABLE, open streams end with
`Draining`), and the release of a client that left (with or without the resume grace).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from dexserve.queue.producer import TRANSIENT, IdConflict, QueueFull, RequestLost, RequestQueue, Submitted
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
MAX_ECHO_CHARS = 64          # a client's string quoted back in an error message is cut to this


def clipped(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` quoted for an error message, at most `limit` characters of it (a
    1 MB model name must not come back as a 1 MB status trailer or HTTP body)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


class Rejected(Exception):
    """A request the gateway refuses, or a stream that ended in an error: a gRPC status code
    (both doors map it) and a message that names the field when a field is at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 final: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.final = final       # the request itself ended (worker error): re-attaching replays it, no retry


class Draining(Rejected):
    """The gateway is shutting down while a stream was open: it ends with UNAVAILABLE. The request
    keeps running for the resume grace; `position` is the first one this client has not received."""

    def __init__(self, request_id: str, position: int) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE,
                         "the gateway is shutting down; send the request again (to another replica)")
        self.request_id = request_id
        self.position = position


class StreamSlot:
    """One open call counted against `GatewayCore.max_streams`; `release` is idempotent."""

    def __init__(self, core: "GatewayCore") -> None:
        self._core = core
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._core.open_streams -= 1


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
                 require_workers: bool = False, max_streams: int = 1000) -> None:
        self.queue = queue
        self.served = served
        self.observer = observer or GatewayObserver()
        self.require_workers = require_workers   # no live worker: UNAVAILABLE instead of waiting in the queue
        self.max_streams = max_streams
        self.open_streams = 0        # calls in progress on both doors (each holds a Redis connection)
        self._draining = asyncio.Event()
        self._leftover_reads: set[asyncio.Task] = set()   # reads of streams whose caller left, finishing

    # ---- drain and the stream limit ---------------------------------------
    def drain(self) -> None:
        """Shutting down: refuse new requests (UNAVAILABLE / 503) and end every open stream with
        `Draining`; clients retry elsewhere (gRPC: same request_id and resume_from). The requests
        keep running in the workers for the queue's resume grace period."""
        self._draining.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:
        if value:
            self._draining.set()
        else:
            self._draining.clear()

    def stream_slot(self) -> StreamSlot:
        """Count one call against `max_streams`; raises `Rejected` (before the call touches Redis)
        when the gateway is draining or full. The caller releases the slot (`follow` does too)."""
        if self.draining:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry on another replica")
        if self.open_streams >= self.max_streams:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"gateway stream limit reached ({self.max_streams} open calls; "
                           f"--max-streams / DEX_MAX_STREAMS): retry later or through another gateway")
        self.open_streams += 1
        return StreamSlot(self)

    # ---- admission -------------------------------------------------------
    async def admit(self, request: pb.GenerateRequest | BadRequest,
                    deadline_s: float | None = None) -> pb.QueuedRequest:
        """Validate, render, enqueue (or attach): the queued request. Raises `Rejected`.
        `deadline_s`: seconds the client will wait (the worker drops it after that)."""
        if isinstance(request, BadRequest):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, request.message, request.field)
        self.observer.on_request(request)
        if self.draining:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry on another replica")
        if self.served.mismatch:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                           f"gateway and workers serve different models: {self.served.mismatch}")
        if not self.served.matches(request.model):
            raise Rejected(grpc.StatusCode.NOT_FOUND,
                           f"model: {clipped(request.model)} is not served here (serving {self.served.card.name!r})", "model")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: at most {MAX_REQUEST_ID_CHARS} characters",
                           "request_id")
        start = resume_position(request)
        if start and not request.request_id:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           "resume_from: needs the request_id of the request to resume", "resume_from")
        if start > self.served.limits.max_new_tokens:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"resume_from: at most {self.served.limits.max_new_tokens}, got {start}", "resume_from")
        rid = request.request_id or uuid.uuid4().hex
        proto = with_defaults(request, rid, self.served.card.name)
        proto.ClearField("resume_from")          # where this client resumes is not part of the request
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
    async def _until_drained(self, rid: str) -> AsyncIterator:
        """The request's token-stream events, until this gateway starts draining (then `_DrainSignal`).
        A read in flight when the caller leaves (drain, a cancelled call, a closed generator) is not
        cancelled: cancelling a blocking XREAD mid-reply could leave it hanging; it is told to stop
        and finishes on its own within one blocking read (`RequestQueue.block_ms`)."""
        stop = False
        it = self.queue.events(rid, stopped=lambda: stop).__aiter__()
        drained = asyncio.ensure_future(self._draining.wait())
        nxt: asyncio.Future | None = None
        try:
            while True:
                if self._draining.is_set():
                    raise _DrainSignal
                nxt = asyncio.ensure_future(it.__anext__())
                await asyncio.wait((nxt, drained), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    raise _DrainSignal
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                nxt = None
                yield item
        finally:
            stop = True
            drained.cancel()
            if nxt is not None and not nxt.done():
                task = asyncio.ensure_future(_finish_read(nxt, it))
                self._leftover_reads.add(task)
                task.add_done_callback(self._leftover_reads.discard)
            else:
                await it.aclose()

    async def follow(self, rid: str, start: int = 0, slot: StreamSlot | None = None,
                     resumable: Callable[[], bool] = lambda: True) -> AsyncIterator[pb.GenerateChunk]:
        """The request's chunks from position `start`, each position once, ending with the finish
        chunk. Raises `Rejected`: the worker's code on an error event (`final`), ABORTED when a
        restarted attempt diverges from a token already sent, FAILED_PRECONDITION when attaching to
        a cancelled request, `Draining` when the gateway shuts down. Leaving early (the caller stops
        iterating) releases this client: if it was the last one, the request is cancelled after the
        resume grace when `resumable()` (else at once). Releases `slot` at the end."""
        next_index = start
        lost = False
        sent: list[int | None] = [None] * start    # token ids forwarded, by position: a restarted attempt must
        finished = False                           # repeat them (positions before `start` the client holds)
        grace = True
        try:
            async with contextlib.aclosing(self._until_drained(rid)) as events:
                async for _entry_id, event in events:
                    if event.HasField("error"):
                        finished = True
                        code = STATUS_BY_VALUE.get(event.error.code, grpc.StatusCode.UNKNOWN)
                        self.observer.on_finish(rid, code.name, next_index)
                        raise Rejected(code, event.error.message, _field_of(event.error.message, code), final=True)
                    chunk = pb.GenerateChunk(request_id=rid, position=next_index,
                                             commit_unix_nanos=event.commit_unix_nanos)
                    texts = []
                    for tok in event.tokens:
                        if tok.index == next_index:      # later: cannot happen (every attempt starts at 0, in order)
                            chunk.token_ids.append(tok.token_id)
                            if tok.HasField("logprobs"):
                                chunk.logprobs.append(tok.logprobs)
                            texts.append(tok.text)
                            sent.append(tok.token_id)
                            next_index += 1
                        elif tok.index < next_index and sent[tok.index] not in (None, tok.token_id):
                            # A restarted attempt produced another token at a position already sent: never
                            # splice two different answers; end the stream so the client retries it whole.
                            finished = True
                            msg = (f"request {rid}: attempt {event.attempt} produced token {tok.token_id} at position "
                                   f"{tok.index}, where token {sent[tok.index]} was already sent; the answer cannot be "
                                   f"continued exactly (retry the request)")
                            log.error(msg)
                            self.observer.on_divergence(rid, tok.index, event.attempt)
                            self.observer.on_finish(rid, grpc.StatusCode.ABORTED.name, next_index)
                            raise Rejected(grpc.StatusCode.ABORTED, msg)
                    if event.HasField("finish") and event.finish.reason == pb.FINISH_REASON_CANCELLED:
                        # Only a client attaching after the request was stopped (its last client left, or
                        # its deadline passed while queued) sees this: what follows is a truncated answer,
                        # so say so instead of ending the call OK.
                        finished = True
                        self.observer.on_finish(rid, grpc.StatusCode.FAILED_PRECONDITION.name, next_index)
                        raise Rejected(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"request_id: request {rid} was cancelled after {next_index} tokens "
                                       f"(its last client left or its deadline passed); send it again with a "
                                       f"new request_id", "request_id")
                    ends = event.HasField("finish")
                    if ends and event.finish.usage.completion_tokens > next_index:
                        # The end of an attempt whose earlier events this stream does not have (a Redis that
                        # lost its data, then an old attempt published on): ending here would leave a gap.
                        # The attempt that restarts the request from position 0 finishes it.
                        log.warning("request %s: skipped a finish after %d tokens at position %d (a gap)", rid,
                                    event.finish.usage.completion_tokens, next_index)
                        ends = False
                    if ends:
                        texts.append(event.finish.text)
                        chunk.finish_reason = event.finish.reason
                        chunk.usage.CopyFrom(event.finish.usage)
                    chunk.text = "".join(texts)
                    if chunk.token_ids and chunk.position == 0:
                        self.observer.on_first_token(rid, event.commit_unix_nanos)
                    if chunk.finish_reason:
                        # finished before the last yield: a caller that stops reading at the finish
                        # chunk (the HTTP door's stream) has not left early, nothing is cancelled
                        finished = True
                        self.observer.on_finish(rid, pb.FinishReason.Name(chunk.finish_reason), next_index)
                        yield chunk
                        return
                    if chunk.token_ids:
                        yield chunk
        except _DrainSignal:
            raise Draining(rid, next_index) from None
        except RequestLost as exc:
            lost = True            # nothing of it is left in Redis to release (and no stale cancel flag to leave)
            self.observer.on_finish(rid, grpc.StatusCode.UNAVAILABLE.name, next_index)
            raise Rejected(grpc.StatusCode.UNAVAILABLE, f"{exc} (resume_from={next_index})") from None
        finally:
            if slot is not None:
                slot.release()
            if not finished and not lost:
                self.observer.on_finish(rid, "CANCELLED", next_index)
                grace = resumable()
            try:   # a client that left may come back within the resume grace (when it can resume at all)
                if not lost:
                    await asyncio.shield(self.queue.release(rid, cancel=not finished, grace=grace))
            except Exception:  # the client is gone either way; the flag's absence only costs work
                log.warning("could not release %s", rid, exc_info=True)


async def _finish_read(read: asyncio.Future, events) -> None:
    """Let a stopped stream's last blocking read end, then close its generator."""
    with contextlib.suppress(BaseException):
        await read
    with contextlib.suppress(Exception):
        await events.aclose()


class _DrainSignal(Exception):
    """Internal: the drain event fired while a stream waited for its next event."""


def resume_position(request: pb.GenerateRequest | BadRequest) -> int:
    """The first position a (gRPC) client still needs: its `resume_from`, 0 by default."""
    if isinstance(request, BadRequest) or not request.HasField("resume_from"):
        return 0
    return request.resume_from


def _field_of(message: str, code: grpc.StatusCode) -> str | None:
    """The field a worker's INVALID_ARGUMENT names (its messages read `field: reason`)."""
    head = message.split(":", 1)[0]
    if code is grpc.StatusCode.INVALID_ARGUMENT and head and ":" in message and \
            all(c.isalnum() or c in "_.[]" for c in head):
        return head
    return None


def join_chunks(chunks: list[pb.GenerateChunk]) -> pb.GenerateChunk:
    """A whole answer from its stream chunks (both doors' non-streaming calls)."""
    out = pb.GenerateChunk()
    texts = []
    for c in chunks:
        out.token_ids.extend(c.token_ids)
        out.logprobs.extend(c.logprobs)
        texts.append(c.text)
        if c.finish_reason:
            out.finish_reason = c.finish_reason
            out.usage.CopyFrom(c.usage)
    out.text = "".join(texts)
    return out
