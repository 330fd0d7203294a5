"""The soak's locust user (`loadtest/soak.py` runs it headless; not meant to be run alone).

Each task streams one case of `--expectations` (a JSON list written by soak.py: prompt, sampling,
max_new_tokens and the token ids the engine in mode `ar` produces for it) through `Generate`, as a
resumable client: on UNAVAILABLE without the `dex-final` trailer (gateway draining or restarted,
Redis down at submit, a request Redis lost) it sends the same request again with the same
request_id and `resume_from` = the next position it needs, like `dexserve.client.stream_generate`
(more tries: a gateway restart on 2 busy cores takes seconds). Every chunk's position must be the
next one; at the end the ids must equal the expectation token for token. One JSON line per stream
goes to `--results` (soak.py reads them): status, check, TTFT, inter-token latency, resumes, and the
gaps between chunks longer than 1 s (to time the recovery after each fault).

Locust request types as in `locustfile.py` (TTFT, ITL, FULL); a stream whose tokens differ from the
expectation is a FULL failure ("spliced").
"""

from __future__ import annotations

import json
import random
import time
import uuid

import grpc
import gevent
from locust import User, between, events, task

from grpc_locust import fire, grpc_target  # noqa: E402  (first: makes gRPC gevent-aware)
from dexserve.queue.protocol import CLIENT_BACKOFF_S, FINAL_METADATA  # noqa: E402
from dexserve.v1 import dex_pb2 as pb  # noqa: E402
from dexserve.v1 import dex_pb2_grpc  # noqa: E402

RETRIES = 15            # tries in a row without progress before giving up
GAP_S = 1.0             # chunk gaps longer than this are recorded


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("dexserve soak")
    g.add_argument("--expectations", default="", help="JSON cases with expected token ids (soak.py writes it)")
    g.add_argument("--results", default="", help="JSONL file: one line per stream")
    g.add_argument("--request-timeout", type=float, default=120.0, help="gRPC deadline per call, seconds")




class SoakUser(User):
    wait_time = between(0.05, 0.25)
    host = "127.0.0.1:50051"
    cases: list[dict] | None = None
    out = None

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        if SoakUser.cases is None:
            with open(opts.expectations) as f:
                SoakUser.cases = json.load(f)
            SoakUser.out = open(opts.results, "a", buffering=1)
        self.timeout = opts.request_timeout
        # Reconnect quickly to a gateway that restarts (gRPC's default backoff grows to minutes).
        self.channel = grpc.insecure_channel(grpc_target(self.host), options=[
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self.stub = dex_pb2_grpc.DexServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        case_no = random.randrange(len(self.cases))
        case = self.cases[case_no]
        req = pb.GenerateRequest(prompt=case["prompt"], max_new_tokens=case["max_new_tokens"],
                                 temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                                 seed=case["seed"], request_id=uuid.uuid4().hex)
        want = case["token_ids"]
        start_wall, start = time.time(), time.perf_counter()
        first = last = prev = None
        ids: list[int] = []
        gaps: list[list[float]] = []
        finish = None
        status, detail, check = "OK", "", "ok"
        resumes, tries = 0, 0
        backoff = CLIENT_BACKOFF_S[0]
        while True:
            try:
                for chunk in self.stub.Generate(req, timeout=self.timeout):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if chunk.position != len(ids) and check == "ok":
                            check = f"position {chunk.position} after {len(ids)} tokens"
                        if first is None:
                            first = now
                            fire("TTFT", now - start, len(chunk.token_ids))
                        if prev is not None and now - prev > GAP_S:
                            gaps.append([round(start_wall + prev - start, 3), round(start_wall + now - start, 3)])
                        prev = last = now
                        ids.extend(chunk.token_ids)
                        req.resume_from = chunk.position + len(chunk.token_ids)
                        tries, backoff = 0, CLIENT_BACKOFF_S[0]
                    if chunk.finish_reason:
                        finish = chunk
                break
            except grpc.RpcError as exc:
                final = tuple(FINAL_METADATA) in tuple(tuple(m) for m in (exc.trailing_metadata() or ()))
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not final and tries < RETRIES:
                    tries += 1
                    resumes += 1
                    gevent.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, CLIENT_BACKOFF_S[1])
                    continue
                status, detail = exc.code().name, (exc.details() or "")[:300]
                break
        end = time.perf_counter()
        if status == "OK":
            if finish is None:
                status = "NO_FINISH"
            elif check == "ok" and ids != want:
                diff = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
                check = f"tokens differ from ar at position {diff} ({len(ids)} received, {len(want)} expected)"
        elif check == "ok" and ids != want[:len(ids)]:
            check = "the partial answer differs from ar"
        record = {"case": case_no, "request_id": req.request_id, "start": round(start_wall, 3),
                  "end": round(start_wall + end - start, 3), "status": status, "detail": detail, "check": check,
                  "tokens": len(ids), "resumes": resumes, "ttft_s": None if first is None else round(first - start, 4),
                  "itl_s": round((last - first) / (len(ids) - 1), 5) if first is not None and len(ids) > 1 else None,
                  "gaps": gaps}
        self.out.write(json.dumps(record) + "\n")
        exc = None if status == "OK" and check == "ok" else RuntimeError(f"{status}: {check} {detail}"[:200])
        if exc is not None and first is None:
            fire("TTFT", end - start, 0, exc)
        if exc is None and first is not None and len(ids) > 1:
            fire("ITL", (last - first) / (len(ids) - 1), len(ids))
        fire("FULL", end - start, len(ids), exc)
