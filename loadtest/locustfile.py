"""Locust load test for DexService's server-streaming `Generate`.

Each task sends one `Generate` and reports three request types (locust's
"Type" column; the name is `Generate`), because a stream has no single latency:

- `TTFT`  time to first token: request sent → first chunk carrying tokens.
- `ITL`   inter-token latency, one event per stream: (last token time − first
          token time) / (tokens − 1), i.e. mean time per output token after
          the first (genai-perf's definition). Per stream rather than per gap
          because DEX commits several tokens in one round and they arrive in one
          chunk: per-gap events would be mostly zeros plus round times.
          Streams with one token report no ITL; a stream that legally
          finishes with no token (EOS first) reports only FULL.
- `FULL`  full-response time: request sent → final chunk (finish_reason);
          response_length is the token count.

Any non-OK gRPC status, a stream that ends without a finish chunk, or a
`usage.completion_tokens` that disagrees with the tokens received is a
failure of `FULL` (and of `TTFT` when no token arrived), which makes a
headless run exit 1.

Host: `--host grpc://127.0.0.1:50051` or `--host 127.0.0.1:50051`.
Prompts: the shipped model's `heldout_prompts.jsonl` (`--prompts-file` to change).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import grpc
from locust import User, between, events, task

from grpc_locust import fire, grpc_target  # noqa: E402  (first: makes gRPC gevent-aware)
from dexserve.v1 import dex_pb2 as pb  # noqa: E402
from dexserve.v1 import dex_pb2_grpc  # noqa: E402

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "service/dexserve/models/dexcode-6m/heldout_prompts.jsonl"


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("dexserve")
    g.add_argument("--max-new-tokens", type=int, default=32, help="max_new_tokens of every request")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--prompts-file", default="", help="JSONL with a 'prompt' field (default: the shipped model's)")
    g.add_argument("--request-timeout", type=float, default=120.0, help="gRPC deadline per stream, seconds")
    g.add_argument("--auth-token", default=os.environ.get("DEX_AUTH_TOKEN", ""), help="bearer token, if required")


def load_prompts(path: str = "") -> list[str]:
    """Prompts from a JSONL file; the shipped model's held-out prompts by default."""
    if path:
        src = Path(path)
    elif REPO_PROMPTS.is_file():
        src = REPO_PROMPTS
    else:  # installed package, not a checkout
        from dexserve.contract.model_card import shipped_model_dir

        src = shipped_model_dir() / "heldout_prompts.jsonl"
    prompts = [json.loads(line)["prompt"] for line in src.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {src}")
    return prompts




class DexStreamUser(User):
    """One gRPC channel per user; each task is one streamed generation."""

    wait_time = between(0.05, 0.25)
    host = "127.0.0.1:50051"
    prompts: list[str] | None = None

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        if DexStreamUser.prompts is None:
            DexStreamUser.prompts = load_prompts(getattr(opts, "prompts_file", ""))
        self.max_new_tokens = getattr(opts, "max_new_tokens", 32)
        self.temperature = getattr(opts, "temperature", 0.0)
        self.timeout = getattr(opts, "request_timeout", 120.0)
        token = getattr(opts, "auth_token", "")
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.channel = grpc.insecure_channel(grpc_target(self.host))
        self.stub = dex_pb2_grpc.DexServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        req = pb.GenerateRequest(prompt=random.choice(self.prompts), max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, seed=random.randrange(1 << 31))
        start = time.perf_counter()
        first = last = None
        tokens = 0
        finish = None
        try:
            for chunk in self.stub.Generate(req, metadata=self.metadata, timeout=self.timeout):
                now = time.perf_counter()
                if chunk.token_ids:
                    if first is None:
                        first = now
                        fire("TTFT", now - start, len(chunk.token_ids))
                    last = now
                    tokens += len(chunk.token_ids)
                if chunk.finish_reason:
                    finish = chunk
            end = time.perf_counter()
            if finish is None:
                raise RuntimeError("stream ended without a finish chunk")
            if finish.usage.completion_tokens != tokens:
                raise RuntimeError(f"usage says {finish.usage.completion_tokens} tokens, received {tokens}")
        except (grpc.RpcError, RuntimeError) as exc:
            end = time.perf_counter()
            if isinstance(exc, grpc.RpcError):
                exc = RuntimeError(f"{exc.code().name}: {exc.details()}")
            if first is None:
                fire("TTFT", end - start, 0, exc)
            fire("FULL", end - start, tokens, exc)
            return
        if first is not None and tokens > 1:   # no token at all (EOS first) is legal: no TTFT/ITL then
            fire("ITL", (last - first) / (tokens - 1), tokens)
        fire("FULL", end - start, tokens)
