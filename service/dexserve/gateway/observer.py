"""Hook points of the gateway for metrics and tracing; no-op by default.

`on_enqueue` may write W3C trace context into `trace_context` (the queue
message's map), which the worker's observer reads: tracing crosses the queue
without a proto change.
"""

from __future__ import annotations

from collections.abc import MutableMapping


class GatewayObserver:
    def on_enqueue(self, request_id: str, attached: bool, trace_context: MutableMapping[str, str]) -> None:
        """The request was enqueued (or attached to a running one)."""

    def on_first_token(self, request_id: str, commit_unix_nanos: int) -> None:
        """The first token reached this client."""

    def on_finish(self, request_id: str, status: str, completion_tokens: int) -> None:
        """The call ended; `status` is a grpc status name or a finish reason."""

    def on_divergence(self, request_id: str, position: int, attempt: int) -> None:
        """A restarted attempt produced a different token at a position already sent:
        the call ends with ABORTED (never a splice)."""
