"""Hook points of the worker loop for metrics and tracing; no-op by default.

The loop calls these at the moments that matter; an OpenTelemetry/Prometheus
observer subclasses this and reads everything from the arguments (round
records are the single source), so adding telemetry never touches the loop.
"""

from __future__ import annotations

from dexserve.contract.records import RoundRecord
from dexserve.contract.request import Finished, TokenEvent
from dexserve.v1 import dex_pb2 as pb


class WorkerObserver:
    def on_request_start(self, request: pb.QueuedRequest, attempt: int) -> None:
        """A request was admitted to the engine. `request.trace_context` holds
        the W3C context the gateway injected (parent for a consumer span)."""

    def on_round(self, record: RoundRecord | None, tokens: list[TokenEvent], finished: list[Finished],
                 publish_seconds: float) -> None:
        """One engine round ran and its tokens were published; called before
        `on_request_finish` of the requests this round finished."""

    def on_request_finish(self, request_id: str, finished: Finished) -> None:
        """The request finished (any reason, cancel included) and was acknowledged."""

    def on_request_failed(self, request_id: str, code: int, message: str) -> None:
        """The request ended with an error its client sees (invalid, dead-lettered)."""

    def on_claim(self, request_id: str, attempt: int) -> None:
        """A request abandoned by a dead worker was claimed for another attempt."""
