"""Claim timing: a live worker is never taken for dead, however long its engine calls take."""

from __future__ import annotations

import threading
import time

import redis

from dexserve.client import stream_generate
from dexserve.contract.request import GenerationRequest
from dexserve.queue.consumer import WorkerQueue
from dexserve.worker.loop import Worker
from dexserve.worker.standin import InstantEngine

from .conftest import TEST_SETTINGS
from .helpers import collect, run_direct, token_events


class SlowAdd(InstantEngine):
    """The stand-in, except that taking a request (the real engine's prefill, or a first-use
    compile) takes several claim periods."""

    began = threading.Event()

    def add(self, req):
        self.began.set()
        time.sleep(3 * TEST_SETTINGS.claim_idle_ms / 1000)
        return super().add(req)


def test_a_long_engine_add_does_not_let_another_worker_claim_the_request(make_gateway, redis_server, names,
                                                                          standin_model):
    client = redis.Redis.from_url(redis_server.url)
    slow = Worker(SlowAdd.load(str(standin_model)), WorkerQueue(client, names, TEST_SETTINGS, "slow"), grace_s=1)
    fast = Worker(InstantEngine.load(str(standin_model)), WorkerQueue(client, names, TEST_SETTINGS, "fast"),
                  grace_s=1)
    loops = [threading.Thread(target=slow.run, daemon=True)]
    loops[0].start()
    try:
        gw = make_gateway()
        result = {}
        t = threading.Thread(target=lambda: result.update(
            out=collect(stream_generate(gw.address, "slow to start", max_new_tokens=6, request_id="slow-1",
                                        timeout=30))))
        t.start()
        assert SlowAdd.began.wait(10), "the slow worker never took the request"
        loops.append(threading.Thread(target=fast.run, daemon=True))   # idle, scanning for stale entries
        loops[-1].start()
        t.join(30)
        ids, text, positions, _ = result["out"]
        assert positions == list(range(6))
        assert (ids, text) == run_direct(InstantEngine.load(str(standin_model)),
                                         GenerationRequest("d", "slow to start", 6))[:2]
        attempts = {e.attempt for e in token_events(client, names, "slow-1") if e.tokens}
        assert attempts == {1}, f"a live worker's request was claimed while its engine took it: {attempts}"
    finally:
        for w in (slow, fast):
            w.request_stop()
        for loop in loops:
            loop.join(10)
        client.close()
