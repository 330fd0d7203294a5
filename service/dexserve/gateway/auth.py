"""Bearer-token authentication as a server interceptor.

Every RPC except the health service (probes carry no credentials) needs
`authorization: Bearer <token>` when a token is configured. Compared in
constant time.
"""

from __future__ import annotations

import hmac

import grpc

EXEMPT = ("/grpc.health.v1.Health/",)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED. A response-streaming
    one is an async generator, as the servicer's is: an outer interceptor (telemetry)
    iterates it with `async for`, which a plain coroutine would fail with a TypeError
    (the client then saw UNKNOWN)."""
    async def abort(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises; the yield makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT):
            return handler
        supplied = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                supplied = value if isinstance(value, str) else value.decode(errors="replace")
        if not supplied:
            return _deny(handler, "missing bearer token (authorization metadata)")
        if not hmac.compare_digest(supplied.encode(), self._expected):
            return _deny(handler, "invalid bearer token")
        return handler
