"""DexService: the gRPC door. Maps messages and status codes; `GatewayCore` (core.py)
admits and follows, the same for both doors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from dexserve.gateway.core import GatewayCore, Rejected, Served
from dexserve.gateway.observer import GatewayObserver
from dexserve.queue.producer import RequestQueue
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc


class DexServicer(dex_pb2_grpc.DexServiceServicer):
    def __init__(self, queue: RequestQueue, served: Served, observer: GatewayObserver | None = None,
                 core: GatewayCore | None = None) -> None:
        self.core = core or GatewayCore(queue, served, observer)
        self.served = served

    # ---- RPCs ------------------------------------------------------------
    async def Generate(self, request, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        qreq = await self._admit(request, context)
        async for chunk in self._follow(qreq.request_id, context):
            yield chunk

    async def Complete(self, request, context: grpc.aio.ServicerContext) -> pb.CompleteResponse:
        qreq = await self._admit(request, context)
        out = pb.CompleteResponse(request_id=qreq.request_id)
        texts = []
        async for chunk in self._follow(qreq.request_id, context):
            out.token_ids.extend(chunk.token_ids)
            out.logprobs.extend(chunk.logprobs)
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
            max_context=limits.max_context, max_new_tokens=limits.max_new_tokens,
            chat=self.served.chat_template is not None)])

    # ---- status mapping --------------------------------------------------
    async def _admit(self, request, context: grpc.aio.ServicerContext) -> pb.QueuedRequest:
        try:
            return await self.core.admit(request, context.time_remaining())
        except Rejected as exc:
            await context.abort(exc.code, exc.message)

    async def _follow(self, rid: str, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async with aclosing(self.core.follow(rid)) as chunks:   # a client gone mid-stream releases at once
                async for chunk in chunks:
                    yield chunk
        except Rejected as exc:
            await context.abort(exc.code, exc.message)
