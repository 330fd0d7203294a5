"""The OpenAI-compatible HTTP door: Starlette on uvicorn, in the gateway's own event loop.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (server-sent events with
`stream: true`, ending `data: [DONE]`), `GET /v1/models`, `GET /health`. A thin edge:
`openai_compat` converts the JSON into the internal request and the chunks back;
`GatewayCore` (the gRPC door's, on the same queue) admits and follows. Errors take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
`HTTP_STATUS` maps each gRPC code to. The bearer token is the gRPC door's
(`auth.BearerToken`); `/health` needs none.

A streaming request waits for its first chunk before it answers, so a request the
worker refuses (or that fails before its first token) still gets its own status
instead of an error inside a 200 stream; after that, an error ends the stream with
an error event and `[DONE]`.

What the gRPC door's resilience means here (all of it in `GatewayCore`): past
`--max-streams` open calls (both doors together) a request is a 429; a restarted
attempt that diverges from a token already sent ends the stream with an `aborted`
error (500 before the first chunk, an error event before `[DONE]` after it); a
draining gateway answers 503 and ends open streams with an `unavailable` error event
and `[DONE]`. HTTP requests carry no request_id and no resume position, so nobody can
re-attach to one: a client that disconnects cancels its request at once (no resume
grace).

Telemetry wraps the app (`asgi_middleware` of the gateway's observer: server span and metrics per
request); the routes report how each call ended as a gRPC status name (`GatewayObserver.on_status`),
which the HTTP status alone cannot say for a stream that ends in an error event after its 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from dexserve.gateway.auth import BearerToken
from dexserve.gateway.core import GatewayCore, Rejected
from dexserve.gateway.openai_compat import (FieldError, Options, chat_request, completion_request, param_message,
                                            view)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20

# gRPC status (the gateway's one vocabulary) -> HTTP status, OpenAI error type, error code.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "server_error", "model_mismatch"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.ABORTED: (500, "server_error", "aborted"),
}


def error_body(code: grpc.StatusCode, message: str, param: str | None = None) -> tuple[int, dict]:
    status, kind, err_code = HTTP_STATUS.get(code, (500, "server_error", None))
    return status, {"error": {"message": message, "type": kind, "param": param, "code": err_code}}


def error_response(code: grpc.StatusCode, message: str, param: str | None = None) -> JSONResponse:
    status, body = error_body(code, message, param)
    return JSONResponse(body, status_code=status)


def _rejected(exc: Rejected, opts: Options | None) -> tuple[int, dict]:
    param, message = param_message(exc.field, exc.message, opts)
    return error_body(exc.code, message, param)


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _read_json(request: Request) -> dict:
    size = 0
    parts = []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise FieldError("body", f"larger than {MAX_BODY_BYTES} bytes")
        parts.append(part)
    try:
        body = json.loads(b"".join(parts) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FieldError("body", f"is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    return body


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


async def _unless_gone(request: Request, awaitable):
    """`awaitable`'s result, or ClientGone as soon as the client disconnects (the work is cancelled)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Rejected):
            await work
        raise ClientGone()
    return work.result()


class OpenAIApp:
    def __init__(self, core: GatewayCore, auth_token: str | None = None) -> None:
        self.core = core
        self.auth = BearerToken(auth_token) if auth_token else None
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ---- routes ----------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat_request)

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        served = self.core.served
        self._report(grpc.StatusCode.OK)
        return JSONResponse({"object": "list", "data": [{
            "id": served.card.name, "object": "model", "created": 0, "owned_by": "dexserve",
            "max_model_len": served.limits.max_context, "chat": served.chat_template is not None}]})

    async def health(self, request: Request) -> Response:
        """200 while this gateway can take requests (Redis answers, the workers serve our model,
        not shutting down); 503 with the reason otherwise. No credentials needed."""
        core = self.core
        reason = "shutting down" if core.draining else (
            f"workers serve a different model: {core.served.mismatch}" if core.served.mismatch else None)
        if reason is None:
            try:
                await asyncio.wait_for(core.queue.redis.ping(), 2.0)
            except Exception as exc:
                reason = f"redis unavailable: {exc or type(exc).__name__}"
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    # ---- the generate path -------------------------------------------------
    async def _generate(self, request: Request, convert) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        opts = None
        slot = None
        try:
            req, opts = convert(await _read_json(request))
            slot = self.core.stream_slot()
            qreq = await self.core.admit(req)
        except FieldError as exc:
            self._report(grpc.StatusCode.INVALID_ARGUMENT)
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, exc.message, exc.param)
        except Rejected as exc:
            if slot is not None:
                slot.release()
            return self._rejected_response(exc, opts)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        out = view(qreq.request_id, self.core.served.card.name, opts, self.core.served.tokenizer)
        # No resume over HTTP (no request_id to re-attach with): leaving cancels at once.
        chunks = self.core.follow(qreq.request_id, slot=slot, resumable=lambda: False)
        streaming = False
        try:
            if opts.stream:
                first = await _unless_gone(request, anext(chunks))
                streaming = True                 # the stream's generator now closes `chunks` (and the slot)
                return self._stream(chunks, first, out, opts)
            response = JSONResponse(out.response(await _unless_gone(request, self._collect(chunks))))
            self._report(grpc.StatusCode.OK)
            return response
        except Rejected as exc:
            await chunks.aclose()
            return self._rejected_response(exc, opts)
        except ClientGone:
            await chunks.aclose()                # releases the request (cancelled if nobody else follows it)
            self._report(grpc.StatusCode.CANCELLED)
            return Response(status_code=499)
        finally:
            if not streaming:
                slot.release()                   # `follow` releases it too; this covers one never started

    @staticmethod
    async def _collect(chunks) -> list:
        async with aclosing(chunks):
            return [c async for c in chunks]

    def _stream(self, chunks, first, out, opts: Options) -> Response:
        async def events() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                chunk = first
                if opts.chat:
                    yield _sse(out.first_chunk())
                try:
                    while True:
                        if chunk.text or chunk.token_ids and opts.logprobs is not None or chunk.finish_reason:
                            yield _sse(out.stream_chunk(chunk))
                        if chunk.finish_reason:
                            if opts.include_usage:
                                yield _sse(out.usage_chunk(chunk.usage))
                            break
                        chunk = await anext(chunks)
                    self._report(grpc.StatusCode.OK)
                except Rejected as exc:
                    self._report(exc.code)       # after the 200: only this event (and telemetry) tells
                    yield _sse(_rejected(exc, opts)[1])
                except (GeneratorExit, asyncio.CancelledError):   # the client left mid-stream
                    self._report(grpc.StatusCode.CANCELLED)
                    raise
                yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- auth and errors -----------------------------------------------------
    def _report(self, code: grpc.StatusCode) -> None:
        """Tell the observer how this call ended (gRPC's vocabulary: the HTTP status cannot say it all)."""
        self.core.observer.on_status(code.name)

    def _rejected_response(self, exc: Rejected, opts: Options | None) -> Response:
        self._report(exc.code)
        status, body = _rejected(exc, opts)
        return JSONResponse(body, status_code=status)

    def _denied(self, request: Request) -> Response | None:
        if self.auth is None:
            return None
        denial = self.auth.denial(request.headers.get("authorization"))
        if not denial:
            return None
        self._report(grpc.StatusCode.UNAUTHENTICATED)
        return error_response(grpc.StatusCode.UNAUTHENTICATED, denial)

    @staticmethod
    async def _not_found(request: Request, exc) -> Response:
        return JSONResponse({"error": {"message": f"no route {request.url.path}", "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}}, status_code=404)

    @staticmethod
    async def _not_allowed(request: Request, exc) -> Response:
        return JSONResponse({"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                                       "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}},
                            status_code=405)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The HTTP door's listener (uvicorn: h11, one event loop with the gRPC server)."""

    def __init__(self, app: OpenAIApp, host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None, middleware: Callable[[ASGIApp], ASGIApp] | None = None) -> None:
        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))       # here, so a taken port fails the gateway's start
        except OSError as exc:
            self.socket.close()
            raise OSError(exc.errno, f"HTTP door: cannot listen on {host}:{port} ({exc.strerror}); "
                                     f"--http-port picks another, 0 turns it off") from exc
        self.port = self.socket.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        asgi = middleware(app.app) if middleware is not None else app.app   # telemetry: outermost, sees auth too
        config = uvicorn.Config(asgi, lifespan="off", log_config=None, access_log=False, http="h11",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_graceful_shutdown=5)
        self.server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self._task.done():
                self._task.result()              # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        if self._task is None:
            return
        self.server.config.timeout_graceful_shutdown = max(0.1, grace)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self._task, grace + 5)
        except (asyncio.TimeoutError, SystemExit):
            self._task.cancel()
        finally:
            self.socket.close()
