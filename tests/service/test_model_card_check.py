"""One model per release: workers publish their model card to Redis, the gateway compares.

- a published card that differs from the gateway's: the gateway refuses to start;
- no card yet (fresh release, workers scaled to zero): it starts and serves (requests queue and
  wake a worker), re-checking on every health tick; a later mismatch turns health NOT_SERVING and
  requests fail with FAILED_PRECONDITION until a matching card is published again.
"""
from __future__ import annotations

import json
import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dexserve.contract.limits import Limits
from dexserve.contract.model_card import ModelCard, card_fingerprint, card_json, card_summary
from dexserve.gateway import server as gateway_server
from dexserve.gateway.config import GatewayConfig
from dexserve.gateway.server import BackgroundGateway, ModelMismatch
from dexserve.v1 import dex_pb2 as pb
from dexserve.v1 import dex_pb2_grpc

from .conftest import TEST_SETTINGS


def _publish(rclient, names, model, limits: Limits) -> dict:
    card = card_json(ModelCard.load(model), limits)
    rclient.set(names.model_card(), card)
    return json.loads(card)


def _config(redis_server, names, model, **kw) -> GatewayConfig:
    return GatewayConfig(redis_url=redis_server.url, port=0, model=str(model), names=names,
                         settings=TEST_SETTINGS, check_model_card=True, **kw)


def test_fingerprint_tracks_model_files_and_limits(standin_model, tmp_path) -> None:
    card = ModelCard.load(standin_model)
    a = card_summary(card, Limits())
    assert card_fingerprint(a) == card_fingerprint(card_summary(ModelCard.load(standin_model), Limits()))
    assert card_fingerprint(a) != card_fingerprint(card_summary(card, Limits(max_context=256)))
    other = shutil.copytree(standin_model, tmp_path / standin_model.name)
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"', '"', 1) + " ")      # same name, different bytes
    assert card_fingerprint(card_summary(ModelCard.load(other), Limits())) != card_fingerprint(a)


def test_worker_publishes_the_same_card_the_gateway_computes(rclient, names, standin_model) -> None:
    from dexserve.engine.config import EngineConfig
    from dexserve.queue.consumer import WorkerQueue
    from dexserve.worker.engines import make_engine
    from dexserve.worker.settings import WorkerSettings

    settings = WorkerSettings(model=str(standin_model), engine="standin", names=names,
                              engine_config=EngineConfig(max_context=300))
    engine = make_engine(settings)        # the worker publishes what its engine serves, as run_worker does
    WorkerQueue(rclient, names, settings.queue, "w1", model_card=card_json(engine.card, engine.limits)).heartbeat([])
    stored = json.loads(rclient.get(names.model_card()))
    summary = stored
    assert stored["fingerprint"] == card_fingerprint(card_summary(ModelCard.load(standin_model),
                                                                  Limits(max_context=300)))
    assert summary["max_context"] == 300 and stored["name"] == standin_model.name
    assert 0 < rclient.ttl(names.model_card()) <= settings.queue.heartbeat_ttl_s, "only live workers' card"


def test_heartbeat_refreshes_the_card_and_it_expires_without_workers(rclient, names) -> None:
    from dexserve.queue.consumer import WorkerQueue

    from .conftest import TEST_SETTINGS as s

    WorkerQueue(rclient, names, s, "w0").heartbeat([])
    assert not rclient.exists(names.model_card()), "no card set: nothing published"
    q = WorkerQueue(rclient, names, s, "w1", model_card='{"fingerprint": "x"}')
    q.heartbeat([])
    assert rclient.get(names.model_card()) == b'{"fingerprint": "x"}'
    assert 0 < rclient.pttl(names.model_card()) <= s.heartbeat_ttl_s * 1000


def test_gateway_refuses_to_start_on_a_different_card(redis_server, rclient, names, standin_model) -> None:
    _publish(rclient, names, standin_model, Limits(max_context=128))
    with pytest.raises(ModelMismatch, match="max_context"):
        BackgroundGateway(_config(redis_server, names, standin_model))


def test_gateway_waits_for_the_workers_card_during_a_rollout(redis_server, rclient, names, standin_model) -> None:
    """Old workers' card at start, the new workers publish ours a moment later: the gateway starts."""
    import threading

    _publish(rclient, names, standin_model, Limits(max_context=128))
    timer = threading.Timer(0.5, _publish, (rclient, names, standin_model, Limits()))
    timer.start()
    gw = BackgroundGateway(_config(redis_server, names, standin_model, model_card_wait_s=10))
    try:
        assert gw.port
    finally:
        timer.join()
        gw.stop()


def test_no_card_yet_then_mismatch_then_match(redis_server, rclient, names, standin_model, monkeypatch) -> None:
    monkeypatch.setattr(gateway_server, "HEALTH_PERIOD_S", 0.05)
    gw = BackgroundGateway(_config(redis_server, names, standin_model))   # no card: starts
    try:
        with grpc.insecure_channel(gw.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = dex_pb2_grpc.DexServiceStub(ch)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(service="")).status

            def wait_for(want: int) -> None:
                deadline = time.monotonic() + 10
                while status() != want:
                    assert time.monotonic() < deadline, f"health never became {want}"
                    time.sleep(0.05)

            wait_for(health_pb2.HealthCheckResponse.SERVING)
            _publish(rclient, names, standin_model, Limits(max_context=128))    # workers serve another card
            wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.RpcError) as err:
                stub.Complete(pb.GenerateRequest(prompt="x", max_new_tokens=1), timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "max_context" in err.value.details()
            _publish(rclient, names, standin_model, Limits())                   # workers rolled to ours
            wait_for(health_pb2.HealthCheckResponse.SERVING)
    finally:
        gw.stop()
