"""DexService: maps messages and status codes; the queue and the engine's
validation do the rest.

Exactly once per position: a restarted request (worker died, entry claimed)
republishes its tokens from position 0; the stream passes on only the token
whose index is the next one this client has not seen, so every position
reaches the client once, in order, whichever attempt produced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import InvalidRequest
from dexserve.contract.validation import Limits, validate_request
from dexserve.gateway.observer import GatewayObserver
from dexserve.gateway.wire import BadRequest
from dexserve.queue.codec import to_generation_request, with_defaults
from dexserve.queue.protocol import FINAL_METADATA, STATUS_BY_VALUE
from dexserve.queue.producer import TRANSIENT, IdConflict, QueueFull, RequestQueue, Submitted
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
MAX_ECHO_CHARS = 64          # a client's string quoted back in an error message is cut to this


def clipped(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` quoted for an error message, at most `limit` characters of it (a
    1 MB model name must not come back as a 1 MB status trailer)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


class Draining(Exception):
    """The gateway is shutting down: the stream ends with UNAVAILABLE (clients resume elsewhere)."""


@dataclass
class Served:
    """The model this gateway validates for (and workers serve)."""

    card: ModelCard
    limits: Limits
    count_tokens: Callable[[str], int] | None   # None: the workers check the context
    mismatch: str | None = None                  # set while the workers' published card differs

    def matches(self, name: str) -> bool:
        return name in ("", self.card.name, str(self.card.path))


class DexServicer(dex_pb2_grpc.DexServiceServicer):
    def __init__(self, queue: RequestQueue, served: Served, observer: GatewayObserver | None = None,
                 max_streams: int = 1000) -> None:
        self.queue = queue
        self.served = served
        self.observer = observer or GatewayObserver()
        self.max_streams = max_streams
        self.open_streams = 0           # Generate/Complete calls in progress (each holds a Redis connection)
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Shutting down: refuse new calls and end every open one with UNAVAILABLE, which clients
        retry (with the same request_id and resume_from) through another gateway. The requests
        keep running in the workers for the queue's resume grace period."""
        self._draining.set()

    @contextlib.asynccontextmanager
    async def _stream_slot(self, context: grpc.aio.ServicerContext):
        """Count this call against `max_streams`; refuse it (before it touches Redis) when full."""
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway shutting down: retry through another one")
        if self.open_streams >= self.max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"gateway stream limit reached ({self.max_streams} open calls; "
                                f"--max-streams / DEX_MAX_STREAMS): retry later or through another gateway")
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1

    # ---- RPCs ------------------------------------------------------------
    async def Generate(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        async with self._stream_slot(context):
            qreq, start = await self._admit(request, context)
            async for chunk in self._follow(qreq.request_id, context, start):
                yield chunk

    async def Complete(self, request, context: grpc.aio.ServicerContext) -> pb.CompleteResponse:
        async with self._stream_slot(context):
            qreq, start = await self._admit(request, context)
            out = pb.CompleteResponse(request_id=qreq.request_id)
            texts = []
            async for chunk in self._follow(qreq.request_id, context, start):
                out.token_ids.extend(chunk.token_ids)
                texts.append(chunk.text)
                if chunk.finish_reason:
                    out.finish_reason = chunk.finish_reason
                    out.usage.CopyFrom(chunk.usage)
            out.text = "".join(texts)
            return out

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        card, limits = self.served.card, self.served.limits
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=card.name, model_type=card.model_type, num_layers=card.num_layers,
            max_context=limits.max_context, max_new_tokens=limits.max_new_tokens)])

    # ---- admission -------------------------------------------------------
    async def _admit(self, request, context: grpc.aio.ServicerContext) -> tuple[pb.QueuedRequest, int]:
        """Validate and enqueue (or attach); returns the queued request and the first position
        this client needs (its `resume_from`, 0 by default)."""
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if self.served.mismatch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"gateway and workers serve different models: {self.served.mismatch}")
        if not self.served.matches(request.model):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model: {clipped(request.model)} is not served here (serving {self.served.card.name!r})")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id: at most {MAX_REQUEST_ID_CHARS} characters")
        start = request.resume_from if request.HasField("resume_from") else 0
        if start and not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "resume_from: needs the request_id of the request to resume")
        if start > self.served.limits.max_new_tokens:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"resume_from: at most {self.served.limits.max_new_tokens}, got {start}")
        rid = request.request_id or uuid.uuid4().hex
        proto = with_defaults(request, rid, self.served.card.name)
        proto.ClearField("resume_from")          # where this client resumes is not part of the request
        greq = to_generation_request(proto)
        try:
            validate_request(greq, self.served.limits, None)      # cheap checks before tokenizing
            if self.served.count_tokens is not None:
                n = await asyncio.to_thread(self.served.count_tokens, greq.prompt)
                validate_request(greq, self.served.limits, n)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}")
        qreq = pb.QueuedRequest(request_id=rid, request=proto, enqueued_unix_ms=int(time.time() * 1000))
        remaining = context.time_remaining()
        if remaining is not None:
            qreq.deadline_unix_ms = int((time.time() + remaining) * 1000)
        self.observer.on_enqueue(rid, False, qreq.trace_context)
        try:
            outcome = await self.queue.submit(qreq)
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except IdConflict as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {exc}")
        except TRANSIENT as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {exc}")
        if outcome is Submitted.ATTACHED:
            self.observer.on_enqueue(rid, True, qreq.trace_context)
        return qreq, start

    # ---- streaming -------------------------------------------------------
    async def _until_drained(self, events: AsyncIterator) -> AsyncIterator:
        """`events`, until this gateway starts draining (then `Draining`)."""
        drained = asyncio.ensure_future(self._draining.wait())
        it = events.__aiter__()
        nxt: asyncio.Future | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                await asyncio.wait((nxt, drained), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    raise Draining
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                nxt = None
                yield item
        finally:
            drained.cancel()
            if nxt is not None and not nxt.done():
                nxt.cancel()
                await asyncio.wait((nxt,))          # let the read unwind before closing its generator
            await it.aclose()

    async def _follow(self, rid: str, context: grpc.aio.ServicerContext,
                      start: int = 0) -> AsyncIterator[pb.GenerateChunk]:
        next_index = start
        sent: list[int | None] = [None] * start    # token ids forwarded, by position: a restarted attempt must
        finished = False                           # repeat them (positions before `start` the client holds)
        deadline_passed = False
        try:
            async with contextlib.aclosing(self._until_drained(self.queue.events(rid))) as events:
                async for _entry_id, event in events:
                    if event.HasField("error"):
                        finished = True
                        code = STATUS_BY_VALUE.get(event.error.code, grpc.StatusCode.UNKNOWN)
                        self.observer.on_finish(rid, code.name, next_index)
                        await context.abort(code, event.error.message, trailing_metadata=(FINAL_METADATA,))
                    chunk = pb.GenerateChunk(request_id=rid, position=next_index,
                                             commit_unix_nanos=event.commit_unix_nanos)
                    texts = []
                    for tok in event.tokens:
                        if tok.index == next_index:      # later: cannot happen (every attempt starts at 0, in order)
                            chunk.token_ids.append(tok.token_id)
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
                            await context.abort(grpc.StatusCode.ABORTED, msg)
                    if event.HasField("finish") and event.finish.reason == pb.FINISH_REASON_CANCELLED:
                        # Only a client attaching after the request was stopped (its last client left, or
                        # its deadline passed while queued) sees this: what follows is a truncated answer,
                        # so say so instead of ending the call OK.
                        finished = True
                        self.observer.on_finish(rid, grpc.StatusCode.FAILED_PRECONDITION.name, next_index)
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                            f"request_id: request {rid} was cancelled after {next_index} tokens "
                                            f"(its last client left or its deadline passed); send it again with a "
                                            f"new request_id")
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
        except Draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"gateway shutting down: reconnect with request_id={rid!r} and "
                                f"resume_from={next_index}")
        finally:
            if not finished:
                self.observer.on_finish(rid, "CANCELLED", next_index)
                remaining = context.time_remaining()
                deadline_passed = remaining is not None and remaining <= 0
            try:   # a client that left may come back within the resume grace; one whose deadline passed may not
                await asyncio.shield(self.queue.release(rid, cancel=not finished, grace=not deadline_passed))
            except Exception:  # the client is gone either way; the flag's absence only costs work
                log.warning("could not release %s", rid, exc_info=True)
