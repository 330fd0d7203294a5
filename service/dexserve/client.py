"""Python client for DexService, and `dex generate --server ADDR`.

`stream_generate` yields GenerateChunk messages as they arrive; `complete`
returns the whole CompleteResponse. Both take the same keyword arguments as
GenerateRequest's fields (`messages` as {"role", "content"} dicts for the chat
form), plus `token` (bearer) and `tls_ca` (PEM path; TLS when given). OpenAI
clients use the HTTP door instead (README "Use it").

Both survive a lost stream: on UNAVAILABLE (a gateway draining for a rolling
update, a dropped connection, Redis down at submit) they reconnect with backoff
(`retries` times in a row, CLIENT_BACKOFF_S) using the same request_id (one is
made up when none is given) and, for streams, `resume_from` = the next position
they need, so every position arrives once and the request keeps running in its
worker meanwhile (the queue's resume grace). An UNAVAILABLE that ended the
request itself (trailing metadata FINAL_METADATA) is not retried.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc

from dexserve.queue.codec import dex_usage_json, finish_reason_name
from dexserve.queue.protocol import CLIENT_BACKOFF_S, CLIENT_RETRIES, FINAL_METADATA
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc


def channel(address: str, tls_ca: str | None = None) -> grpc.Channel:
    if tls_ca:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    return grpc.insecure_channel(address)


def build_request(prompt: str = "", *, model: str = "", max_new_tokens: int | None = None, temperature: float = 0.0,
                  top_k: int = 0, top_p: float | None = None, seed: int = 0, stop: list[str] | tuple = (),
                  request_id: str = "", messages: list[dict] | tuple = (),
                  logprobs: int | None = None) -> pb.GenerateRequest:
    """`messages` ({"role", "content"} dicts) instead of `prompt`: the chat form, rendered by the
    server with the model's chat template. `logprobs`: N alternatives per token (0..20) in each
    chunk's `logprobs`."""
    req = pb.GenerateRequest(model=model or "", prompt=prompt, temperature=temperature, top_k=top_k, seed=seed,
                             stop=list(stop), request_id=request_id,
                             messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if top_p is not None:
        req.top_p = top_p
    if logprobs is not None:
        req.logprobs = logprobs
    return req


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE that did not end the request itself."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return FINAL_METADATA not in tuple(tuple(m) for m in trailing or ())


class _Backoff:
    def __init__(self, retries: int) -> None:
        self.retries, self.left, self.delay = retries, retries, CLIENT_BACKOFF_S[0]

    def wait_or_raise(self, exc: grpc.RpcError) -> None:
        if not retryable(exc) or self.left <= 0:
            raise exc
        self.left -= 1
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, CLIENT_BACKOFF_S[1])

    def progress(self) -> None:
        self.left, self.delay = self.retries, CLIENT_BACKOFF_S[0]


def stream_generate(address: str, prompt: str, *, token: str | None = None, tls_ca: str | None = None,
                    timeout: float | None = None, retries: int = CLIENT_RETRIES,
                    **fields) -> Iterator[pb.GenerateChunk]:
    req = build_request(prompt, **fields)
    if retries and not req.request_id:
        req.request_id = uuid.uuid4().hex      # a reconnect must name the request it resumes
    backoff = _Backoff(retries)
    with channel(address, tls_ca) as ch:
        stub = dex_pb2_grpc.DexServiceStub(ch)
        while True:
            try:
                for chunk in stub.Generate(req, metadata=_metadata(token), timeout=timeout):
                    req.resume_from = chunk.position + len(chunk.token_ids)
                    backoff.progress()
                    yield chunk
                return
            except grpc.RpcError as exc:
                backoff.wait_or_raise(exc)


def complete(address: str, prompt: str, *, token: str | None = None, tls_ca: str | None = None,
             timeout: float | None = None, retries: int = CLIENT_RETRIES, **fields) -> pb.CompleteResponse:
    req = build_request(prompt, **fields)
    if retries and not req.request_id:
        req.request_id = uuid.uuid4().hex
    backoff = _Backoff(retries)
    with channel(address, tls_ca) as ch:
        stub = dex_pb2_grpc.DexServiceStub(ch)
        while True:
            try:
                return stub.Complete(req, metadata=_metadata(token), timeout=timeout)
            except grpc.RpcError as exc:
                backoff.wait_or_raise(exc)


def run_generate_cli(args: argparse.Namespace) -> int:
    """`dex generate --server ADDR`: stream text to stdout, or one JSON object
    with --json. --mode/--explorers/--width are the server's choice and ignored here."""
    fields = dict(model=getattr(args, "model", None) or "", max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature or 0.0, top_k=args.top_k or 0, top_p=args.top_p,
                  seed=args.seed or 0, stop=args.stop or [])
    ids: list[int] = []
    texts: list[str] = []
    reason = ""
    usage = None
    try:
        for chunk in stream_generate(args.server, args.prompt, token=getattr(args, "token", None),
                                     tls_ca=getattr(args, "tls_ca", None), **fields):
            ids.extend(chunk.token_ids)
            texts.append(chunk.text)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            if chunk.finish_reason:
                reason = finish_reason_name(chunk.finish_reason)
                usage = chunk.usage
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        usage_out = {"prompt_tokens": usage.prompt_tokens if usage else 0,
                     "completion_tokens": usage.completion_tokens if usage else 0}
        if usage is not None and (dex := dex_usage_json(usage)) is not None:
            usage_out["dex"] = dex
        print(json.dumps({"text": "".join(texts), "token_ids": ids, "finish_reason": reason, "usage": usage_out}))
    else:
        sys.stdout.write("\n")
    return 0
