"""DexService: the gRPC door. Maps messages and status codes; `GatewayCore` (core.py)
admits and follows, the same for both doors (stream limit, verified exactly-once, drain,
resume grace included). What is gRPC's own: `resume_from` (a reconnecting client's first
position) and the FINAL_METADATA trailer on a call that ended because its request ended."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from dexserve.gateway.core import (Draining, GatewayCore, Rejected, Served, StreamSlot, join_chunks,
                                   resume_position)
from dexserve.gateway.observer import GatewayObserver
from dexserve.queue.protocol import FINAL_METADATA
from dexserve.queue.producer import RequestQueue
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc


class DexServicer(dex_pb2_grpc.DexServiceServicer):
    def __init__(self, queue: RequestQueue, served: Served, observer: GatewayObserver | None = None,
                 core: GatewayCore | None = None, max_streams: int = 1000) -> None:
        self.core = core or GatewayCore(queue, served, observer, max_streams=max_streams)
        self.served = served

    @property
    def open_streams(self) -> int:
        return self.core.open_streams

    def drain(self) -> None:
        self.core.drain()

    # ---- RPCs ------------------------------------------------------------
    async def Generate(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        slot = await self._slot(context)
        try:
            qreq = await self._admit(request, context)
            async for chunk in self._follow(qreq.request_id, context, resume_position(request), slot):
                yield chunk
        finally:
            slot.release()

    async def Complete(self, request, context: grpc.aio.ServicerContext) -> pb.CompleteResponse:
        slot = await self._slot(context)
        try:
            qreq = await self._admit(request, context)
            chunks = [c async for c in self._follow(qreq.request_id, context, resume_position(request), slot)]
            whole = join_chunks(chunks)
            return pb.CompleteResponse(request_id=qreq.request_id, text=whole.text, token_ids=whole.token_ids,
                                       finish_reason=whole.finish_reason, usage=whole.usage,
                                       logprobs=whole.logprobs)
        finally:
            slot.release()

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        card, limits = self.served.card, self.served.limits
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=card.name, model_type=card.model_type, num_layers=card.num_layers,
            max_context=limits.max_context, max_new_tokens=limits.max_new_tokens,
            chat=self.served.chat_template is not None)])

    # ---- status mapping --------------------------------------------------
    async def _slot(self, context: grpc.aio.ServicerContext) -> StreamSlot:
        try:
            return self.core.stream_slot()
        except Rejected as exc:
            await context.abort(exc.code, exc.message)

    async def _admit(self, request, context: grpc.aio.ServicerContext) -> pb.QueuedRequest:
        try:
            return await self.core.admit(request, context.time_remaining())
        except Rejected as exc:
            await context.abort(exc.code, exc.message)

    async def _follow(self, rid: str, context: grpc.aio.ServicerContext, start: int,
                      slot: StreamSlot) -> AsyncIterator[pb.GenerateChunk]:
        def resumable() -> bool:            # a client whose deadline passed may not come back for it
            remaining = context.time_remaining()
            return remaining is None or remaining > 0

        try:
            async with aclosing(self.core.follow(rid, start, slot, resumable)) as chunks:   # a client gone
                async for chunk in chunks:                                                 # releases at once
                    yield chunk
        except Draining as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"gateway shutting down: reconnect with request_id={exc.request_id!r} and "
                                f"resume_from={exc.position}")
        except Rejected as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=(FINAL_METADATA,) if exc.final else ())
