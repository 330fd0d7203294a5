"""Assemble and run the gateway: DexService, health, reflection, auth, TLS, and the
OpenAI-compatible HTTP door (`http_api`) on the same core, queue and event loop.

`Gateway.start` is what `dex gateway` runs and what tests and the benchmark
start in-process (`BackgroundGateway` runs one on its own event-loop thread).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dexserve.contract.model_card import CAPABILITIES, ModelCard, card_difference, card_fingerprint, card_summary
from dexserve.gateway.auth import BearerAuth
from dexserve.gateway.config import GatewayConfig
from dexserve.gateway.observer import GatewayObserver
from dexserve.gateway.core import GatewayCore, Served
from dexserve.gateway.http_api import HttpServer, OpenAIApp
from dexserve.gateway.servicer import DexServicer
from dexserve.gateway.wire import deserialize_generate_request
from dexserve.queue.producer import RequestQueue
from dexserve.v1 import dex_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["DexService"].full_name
HEALTH_PERIOD_S = 5.0


def load_served(config: GatewayConfig) -> Served:
    """The model card and a prompt-token counter from its own tokenizer,
    encoding as the engine does (no special tokens added), so the
    context check counts exactly what the engine will; the limits are the
    ones the engine builds from the same max_context / max_new_tokens."""
    card = ModelCard.load(config.model)
    tokenizer = card.prompt_tokenizer()
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: prompts are checked against the context only by the workers", card.path)
    template = card.chat_template()
    if template is None:
        log.info("%s has no chat template: chat requests (messages) are refused", card.path)
    return Served(card=card, limits=config.limits, count_tokens=tokenizer.count if tokenizer else None,
                  tokenizer=tokenizer, chat_template=template)


class ModelMismatch(RuntimeError):
    """The workers published a model card that differs from the gateway's."""


async def check_model_card(client: aioredis.Redis, config: GatewayConfig, served: Served) -> str | None:
    """Compare the card the workers published (`QueueNames.model_card`) with ours.
    Returns the difference ('' = equal) or None when no worker has published yet."""
    raw = await client.get(config.names.model_card())
    if raw is None:
        return None
    theirs = json.loads(raw)
    ours = card_summary(served.card, served.limits)
    if theirs.get("fingerprint") == card_fingerprint(ours):
        return ""
    theirs.pop("fingerprint", None)
    theirs.pop(CAPABILITIES, None)
    return card_difference(ours, theirs) or "fingerprint differs"


def _handlers(servicer: DexServicer) -> grpc.GenericRpcHandler:
    """DexService's method table, with the lenient request deserializer."""
    ser = lambda m: m.SerializeToString()  # noqa: E731
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=deserialize_generate_request, response_serializer=ser),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=deserialize_generate_request, response_serializer=ser),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=pb.ListModelsRequest.FromString, response_serializer=ser),
    })


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    redis: aioredis.Redis
    health: health.aio.HealthServicer
    served: Served | None = None
    config: GatewayConfig | None = None
    servicer: DexServicer | None = None
    core: GatewayCore | None = None
    http: HttpServer | None = None          # the OpenAI-compatible door, when config.http_port is set
    _monitor: asyncio.Task | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    @classmethod
    async def start(cls, config: GatewayConfig, observer: GatewayObserver | None = None,
                    served: Served | None = None) -> "Gateway":
        served = served or await asyncio.to_thread(load_served, config)
        client = aioredis.Redis.from_url(config.redis_url, max_connections=config.redis_pool_size,
                                         socket_timeout=config.redis_socket_timeout_s,
                                         socket_connect_timeout=config.redis_socket_timeout_s)
        # One model per release: refuse to start when the workers serve another. No card yet
        # (a new release, workers scaled to zero) is not an error: requests queue and wake a
        # worker; the health loop re-checks and refuses requests on a later mismatch.
        diff = await check_model_card(client, config, served) if config.check_model_card else ""
        deadline = asyncio.get_running_loop().time() + config.model_card_wait_s
        while diff and asyncio.get_running_loop().time() < deadline:
            log.warning("workers serve a different model (%s); waiting up to %.0f s for theirs to change",
                        diff, config.model_card_wait_s)
            await asyncio.sleep(min(1.0, config.model_card_wait_s))
            diff = await check_model_card(client, config, served)
        if diff:
            await client.aclose()
            raise ModelMismatch(f"workers serve a different model than this gateway ({diff}); "
                                f"set the same model for both (chart value `model`)")
        if diff is None:
            log.warning("no worker has published its model card yet; checking again every %.0f s", HEALTH_PERIOD_S)
        queue = RequestQueue(client, config.names, config.settings, block_ms=config.stream_block_ms)
        core = GatewayCore(queue, served, observer, require_workers=config.require_workers,
                           max_streams=config.max_streams)
        servicer = DexServicer(queue, served, observer, core=core)
        interceptors = list(getattr(observer, "interceptors", ()))   # telemetry first: it sees auth failures
        interceptors += [BearerAuth(config.auth_token)] if config.auth_token else []
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((_handlers(servicer),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            creds = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                  Path(config.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        http = None
        if config.http_port is not None:
            http = HttpServer(OpenAIApp(core, config.auth_token), config.host, config.http_port,
                              config.tls_cert, config.tls_key, getattr(observer, "asgi_middleware", None))
        await server.start()
        if http is not None:
            await http.start()
        gw = cls(server, port, client, health_servicer, served=served, config=config, servicer=servicer,
                 core=core, http=http)
        gw._monitor = asyncio.create_task(gw._watch_redis())
        return gw

    async def _watch_redis(self) -> None:
        """SERVING while Redis answers and the workers' model card (if any) matches ours:
        a gateway that cannot enqueue, or would validate for another model, fails its probe
        (and refuses requests with FAILED_PRECONDITION while the cards differ)."""
        status = health_pb2.HealthCheckResponse
        while True:
            try:
                await self.redis.ping()
                state = status.SERVING
                if self.served is not None and self.config is not None and self.config.check_model_card:
                    diff = await check_model_card(self.redis, self.config, self.served)
                    if diff and diff != self.served.mismatch:
                        log.error("workers serve a different model: %s", diff)
                    self.served.mismatch = diff or None
                    if diff:
                        state = status.NOT_SERVING
            except Exception:
                state = status.NOT_SERVING
            for name in ("", SERVICE):
                await self.health.set(name, state)
            await asyncio.sleep(HEALTH_PERIOD_S)

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: NOT_SERVING, every open stream ends (gRPC: UNAVAILABLE telling its client where to
        resume; HTTP: an error event and [DONE]; the requests keep running for the resume grace),
        new requests get UNAVAILABLE / 503, then both servers stop."""
        if self._monitor:
            self._monitor.cancel()
        if self.core is not None:
            self.core.drain()                   # both doors: new requests UNAVAILABLE / 503, open streams end
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await asyncio.gather(self.http.stop(grace), self.server.stop(grace))
        else:
            await self.server.stop(grace)
        await self.redis.aclose()


class BackgroundGateway:
    """A gateway on its own event-loop thread, for tests and the benchmark."""

    def __init__(self, config: GatewayConfig, observer: GatewayObserver | None = None,
                 served: Served | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway", daemon=True)
        self._thread.start()
        self.gateway: Gateway = asyncio.run_coroutine_threadsafe(
            Gateway.start(config, observer, served), self._loop).result(timeout=120)
        self.port = self.gateway.port
        self.address = f"{config.host}:{self.port}"
        self.http_port = self.gateway.http_port
        self.http_url = f"http://{config.host}:{self.http_port}" if self.http_port else None

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(0.5), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

