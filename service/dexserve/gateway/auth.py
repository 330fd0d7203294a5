"""Bearer-token authentication, one check for both doors.

`BearerToken.denial` is the comparison (constant time); `BearerAuth` applies it
to every RPC except the health service (probes carry no credentials), the HTTP
door to every route except `/health`. The token is `GatewayConfig.auth_token`
(`--auth-token` / DEX_AUTH_TOKEN), one setting for both.
"""

from __future__ import annotations

import hmac

import grpc

EXEMPT = ("/grpc.health.v1.Health/",)


class BearerToken:
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def denial(self, supplied: str | None) -> str | None:
        """Why `supplied` (the authorization header / metadata) is refused; None when it is right."""
        if not supplied:
            return "missing bearer token (authorization: Bearer <token>)"
        if not hmac.compare_digest(supplied.encode(errors="replace"), self._expected):
            return "invalid bearer token"
        return None


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
        self.token = BearerToken(token)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT):
            return handler
        supplied = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                supplied = value if isinstance(value, str) else value.decode(errors="replace")
        denial = self.token.denial(supplied)
        return _deny(handler, denial) if denial else handler
