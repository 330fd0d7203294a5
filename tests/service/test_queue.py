"""Queue core against the real (6.2) server: group creation, claims, heartbeats, lag."""

import time

from dexserve.queue.consumer import WorkerQueue
from dexserve.queue.lag import group_lag, pending
from dexserve.queue.protocol import GROUP, REQUEST_FIELD, QueueSettings
from dexserve.v1 import dex_pb2 as pb

FAST = QueueSettings(claim_idle_ms=150, heartbeat_interval_s=0.01)


def _enqueue(client, names, rid):
    return client.xadd(names.requests, {REQUEST_FIELD: pb.QueuedRequest(request_id=rid).SerializeToString()})


def test_group_created_once_and_reads_backlog(rclient, names):
    _enqueue(rclient, names, "a")
    q = WorkerQueue(rclient, names, FAST, "c1")
    q.ensure_group()
    q.ensure_group()   # BUSYGROUP ignored
    assert [e.request_id for e in q.read_new(10, None)] == ["a"]


def test_autoclaim_after_idle_and_deleted_entries(rclient, names):
    a = WorkerQueue(rclient, names, FAST, "dead")
    b = WorkerQueue(rclient, names, FAST, "alive")
    a.ensure_group()
    _enqueue(rclient, names, "x")
    gone = _enqueue(rclient, names, "y")
    assert len(a.read_new(10, None)) == 2
    assert b.claim_stale(10) == []            # not idle yet
    rclient.xdel(names.requests, gone)        # deleted while pending
    time.sleep(0.2)
    claimed = b.claim_stale(10)
    assert [e.request_id for e in claimed] == ["x"]
    assert pending(rclient, names) == 1       # the deleted one was acknowledged away


def test_heartbeat_keeps_entries_and_reports_loss(rclient, names):
    a = WorkerQueue(rclient, names, FAST, "a")
    b = WorkerQueue(rclient, names, FAST, "b")
    a.ensure_group()
    _enqueue(rclient, names, "x")
    [entry] = a.read_new(1, None)
    for _ in range(4):
        time.sleep(0.06)
        assert a.heartbeat([entry.entry_id]) == {entry.entry_id}
    assert b.claim_stale(10) == []            # refreshed: never idle long enough
    time.sleep(0.2)
    assert [e.entry_id for e in b.claim_stale(10)] == [entry.entry_id]
    assert a.heartbeat([entry.entry_id]) == set()   # lost, and not stolen back
    assert rclient.xpending_range(names.requests, GROUP, "-", "+", 1)[0]["consumer"] == b"b"


def test_lag_counts_undelivered_entries_without_xinfo_lag(rclient, names):
    for i in range(3):
        _enqueue(rclient, names, f"r{i}")
    assert group_lag(rclient, names) == 3     # no group yet
    q = WorkerQueue(rclient, names, FAST, "c")
    q.ensure_group()
    assert group_lag(rclient, names) == 3
    q.read_new(1, None)
    assert group_lag(rclient, names) == 2


def test_settings_refuse_a_heartbeat_that_could_let_a_live_worker_look_dead():
    import pytest

    from dexserve.queue.protocol import HEARTBEATS_PER_CLAIM

    QueueSettings(claim_idle_ms=1500, heartbeat_interval_s=1500 / 1000 / HEARTBEATS_PER_CLAIM)   # the limit
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        QueueSettings(claim_idle_ms=1000, heartbeat_interval_s=0.5)
    with pytest.raises(ValueError, match="claim_interval_ms"):
        QueueSettings(claim_interval_ms=0)
    d = QueueSettings()
    assert d.claim_idle_ms <= 3000 and d.claim_interval_ms <= d.claim_idle_ms / 4


def test_heartbeat_of_a_worker_whose_group_vanished_owns_nothing(rclient, names):
    """Redis came back without its data: the group is gone, so the worker holds nothing any more."""
    a = WorkerQueue(rclient, names, FAST, "a")
    a.ensure_group()
    _enqueue(rclient, names, "x")
    [entry] = a.read_new(1, None)
    rclient.delete(names.requests)
    assert a.heartbeat([entry.entry_id]) == set()
