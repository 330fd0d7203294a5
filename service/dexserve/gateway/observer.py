"""Hook points of the gateway for metrics and tracing; no-op by default.

`on_enqueue` may write W3C trace context into `trace_context` (the queue
message's map), which the worker's observer reads: tracing crosses the queue
without a proto change.

Where a call begins and ends is the transport's business, so an observer may
also wrap both doors: `interceptors` (grpc.aio server interceptors, outermost
first) and `asgi_middleware` (a function from the HTTP door's ASGI app to the
app to serve). The hooks below run inside the call they belong to (its task,
or a task started from it), whichever door it came through.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from dexserve.v1 import dex_pb2 as pb


class GatewayObserver:
    def on_request(self, request: pb.GenerateRequest) -> None:
        """A request (either door's, converted to the one internal form) is about to be admitted."""

    def on_enqueue(self, request_id: str, attached: bool, trace_context: MutableMapping[str, str]) -> None:
        """The request was enqueued (or attached to a running one)."""

    def on_first_token(self, request_id: str, commit_unix_nanos: int) -> None:
        """The first token reached this client."""

    def on_finish(self, request_id: str, status: str, completion_tokens: int) -> None:
        """The call ended; `status` is a grpc status name or a finish reason."""

    def on_status(self, status: str) -> None:
        """How the call ended, as a gRPC status name (the gateway's one vocabulary), reported by a door
        whose own status cannot say it all (HTTP: a stream that ends in an error event after its 200).
        The last report of a call wins."""

    def on_divergence(self, request_id: str, position: int, attempt: int) -> None:
        """A restarted attempt produced a different token at a position already sent:
        the call ends with ABORTED (never a splice)."""
