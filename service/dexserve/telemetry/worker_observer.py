"""The worker loop's observer: consumer and decode spans, and the worker metrics.

Everything comes from the hook arguments: the queued request (W3C context,
sampling parameters, enqueue time), the round's `RoundRecord` (commits,
collapses, segments, occupancy, timings) and `Finished` (usage, reason). The
per-round path does a handful of counter increments and, only for requests
whose decode span records, one span event per commit and per collapse.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from dexserve.contract.engine import EngineInfo
from dexserve.contract.records import FALLBACK, RoundRecord
from dexserve.contract.request import Finished, TokenEvent
from dexserve.queue.protocol import GROUP, STATUS_BY_VALUE, QueueNames
from dexserve.telemetry import tracing as t
from dexserve.telemetry.metrics import WorkerMetrics
from dexserve.v1 import dex_pb2 as pb
from dexserve.contract.observer import WorkerObserver

log = logging.getLogger(__name__)



@dataclass
class _Running:
    consumer: Span
    decode: Span
    rounds_before: int            # the observer's round count when the request started


class WorkerTelemetry(WorkerObserver):
    def __init__(self, tracer: Tracer | None = None, metrics: WorkerMetrics | None = None,
                 names: QueueNames | None = None, model: str = "", explorers: int = 0, mode: str = "",
                 slots: int = 0) -> None:
        self.tracer = tracer or trace.NoOpTracer()
        self.metrics = metrics
        self.destination = (names or QueueNames()).requests
        self.model, self.explorers, self.mode = model, explorers, mode
        self._running: dict[str, _Running] = {}
        self._spans: dict[str, Span] = {}          # decode spans that record: the per-round event targets
        self._last_commit: dict[str, float] = {}    # request → monotonic time of its last commit (ITL)
        self._rounds = 0                             # rounds seen (RPT: rounds while a request ran / its tokens)
        self._lock = threading.Lock()
        self._boundary: dict[int, object] = {}
        if metrics is not None and slots:
            metrics.slots.set(slots)

    @classmethod
    def for_engine(cls, info: EngineInfo, tracer: Tracer | None, metrics: WorkerMetrics | None,
                   names: QueueNames | None) -> "WorkerTelemetry":
        return cls(tracer, metrics, names, model=info.model, explorers=info.explorers, mode=info.mode,
                   slots=info.lattice_slots)

    # ---- hooks -------------------------------------------------------------
    def on_request_start(self, request: pb.QueuedRequest, attempt: int) -> None:
        rid = request.request_id
        m = self.metrics
        if m is not None and attempt <= 1 and request.enqueued_unix_ms:
            m.queue_wait.observe(max(0.0, time.time() - request.enqueued_unix_ms / 1000))
        self._end(rid, None)   # a second start of the same id (claimed back): close the old spans
        parent = t.extract_context(request.trace_context)
        consumer = self.tracer.start_span(
            t.CONSUMER_SPAN.format(destination=self.destination), context=parent, kind=SpanKind.CONSUMER,
            attributes={t.MESSAGING_SYSTEM: "redis", t.MESSAGING_DESTINATION: self.destination,
                        t.MESSAGING_OPERATION_TYPE: "process", t.MESSAGING_MESSAGE_ID: rid,
                        t.MESSAGING_CONSUMER_GROUP: GROUP, t.REQUEST_ID: rid, t.ATTEMPT: attempt})
        req = request.request
        decode = self.tracer.start_span(
            t.DECODE_SPAN, context=trace.set_span_in_context(consumer),
            attributes={t.GEN_AI_OPERATION: t.TEXT_COMPLETION, t.GEN_AI_MODEL: req.model or self.model,
                        t.GEN_AI_MAX_TOKENS: req.max_new_tokens, t.GEN_AI_TEMPERATURE: req.temperature,
                        t.GEN_AI_TOP_P: req.top_p if req.HasField("top_p") else 1.0, t.GEN_AI_TOP_K: req.top_k,
                        t.GEN_AI_SEED: req.seed, t.REQUEST_ID: rid, t.EXPLORERS: self.explorers, t.MODE: self.mode})
        with self._lock:
            self._running[rid] = _Running(consumer, decode, self._rounds)
            if decode.is_recording():
                self._spans[rid] = decode
            if m is not None:
                m.active.set(len(self._running))

    def on_round(self, record: RoundRecord | None, tokens: list[TokenEvent], finished: list[Finished],
                 publish_seconds: float) -> None:
        if record is None:
            return
        self._rounds += 1
        if self._spans:
            t.add_round_events(self._spans, record)
        m = self.metrics
        if m is None:
            return
        now = time.monotonic()
        n = len(record.commits)
        m.rounds.inc()
        m.request_rounds.inc(len(self._running))
        m.node_segments.inc(record.node_segments)
        if record.wasted_node_segments:
            m.wasted.inc(record.wasted_node_segments)
        m.live_nodes.set(record.live_nodes)
        m.round_seconds.labels("executor").observe(record.seconds)
        m.round_seconds.labels("lattice").observe(record.lattice_seconds)
        m.round_seconds.labels("publish").observe(publish_seconds)
        if n:
            m.tokens.inc(n)
            m.observe_round_tokens(n, now)
            last = self._last_commit
            for c in record.commits:
                child = self._boundary.get(c.boundary)
                if child is None:
                    child = self._boundary[c.boundary] = m.commits.labels(
                        "fallback" if c.boundary == FALLBACK else str(c.boundary))
                child.inc()
                prev = last.get(c.request_id)
                if prev is not None:
                    m.itl.observe(now - prev)
                last[c.request_id] = now

    def on_request_finish(self, request_id: str, finished: Finished) -> None:
        run = self._end(request_id, finished)
        m = self.metrics
        if m is not None:
            m.finished.labels(finished.reason.value).inc()
            if run is not None and finished.completion_tokens:
                m.rpt.observe((self._rounds - run.rounds_before) / finished.completion_tokens)

    def on_request_failed(self, request_id: str, code: int, message: str) -> None:
        name = STATUS_BY_VALUE[code].name if code in STATUS_BY_VALUE else str(code)
        if self.metrics is not None:
            self.metrics.errors.labels(name).inc()
        self._end(request_id, None, error=f"{name}: {message}")

    def on_claim(self, request_id: str, attempt: int) -> None:
        if self.metrics is not None:
            self.metrics.claims.inc()

    # ---- ending --------------------------------------------------------------
    def _end(self, rid: str, finished: Finished | None, error: str | None = None) -> _Running | None:
        with self._lock:
            run = self._running.pop(rid, None)
            self._spans.pop(rid, None)
            self._last_commit.pop(rid, None)
            if self.metrics is not None:
                self.metrics.active.set(len(self._running))
        if run is None:
            return None
        decode = run.decode
        if decode.is_recording():
            if finished is not None:
                rounds = self._rounds - run.rounds_before
                decode.set_attributes({
                    t.GEN_AI_INPUT_TOKENS: finished.prompt_tokens, t.GEN_AI_OUTPUT_TOKENS: finished.completion_tokens,
                    t.GEN_AI_FINISH_REASONS: (finished.reason.value,),
                    t.RPT: rounds / finished.completion_tokens if finished.completion_tokens else 0.0})
            if error is not None:
                decode.set_status(Status(StatusCode.ERROR, error))
                run.consumer.set_status(Status(StatusCode.ERROR, error))
        decode.end()
        run.consumer.end()
        return run

    def close(self) -> None:
        """Shutdown: end spans of requests handed back or lost (they continue elsewhere)."""
        for rid in list(self._running):
            run = self._end(rid, None)
            if run is not None:
                log.debug("ended spans of %s at shutdown", rid)
