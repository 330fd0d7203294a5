"""How explorer processes exchange a round: the plan out, candidates back, and
hidden states from explorer k to k+1.

`CollectiveTransport` is torch.distributed: gloo on CPU, NCCL on CUDA, across
hosts under torchrun. On one host with CPU explorers the round's messages are a
few kilobytes and gloo's TCP round trips cost more than a segment's compute, so
`SharedMemoryTransport` keeps the plan, the candidates and the hidden-state
buffer itself in shared memory and signals through shared sequence counters
(spin, then sleep on a semaphore): explorer k
writes a node's hidden state into the slot explorer k+1 reads next round, as in
the one-process reference executor (a node runs one segment per round, so no
slot is read and written in the same round).

Protocol (both): the coordinator (rank 0) `broadcast`s a command; every rank
runs it and answers (`gather` for a round, `wait_all` for other commands), so
the coordinator never overwrites a command a rank is still reading.

Timeouts: waiting for an answer is bounded (a peer that stops answering fails
the round), waiting for the next command is not: a worker may sit idle for
hours, and its explorers must still be there. A dead peer is noticed anyway
(the coordinator checks its children; an explorer checks its parent; gloo sees
the TCP connection close).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import threading
import time
from datetime import timedelta
from typing import Callable, Literal, Protocol

import torch
import torch.distributed as dist

TransportKind = Literal["auto", "shm", "torch"]
TIMEOUT = timedelta(seconds=60)   # for an answer within a command
STARTUP = timedelta(minutes=15)   # for explorers to load and compile their steps
IDLE = timedelta(days=365)        # for the next command: none in practice
POLL_S = 0.2  # how often a blocked wait checks that its peers are alive


class PeerLost(RuntimeError):
    """A peer process died or stopped answering within the timeout."""


class Transport(Protocol):
    shares_hidden: bool  # True: explorers read each other's hidden states in place

    def broadcast(self, payload: torch.Tensor) -> None: ...
    def gather(self, cand: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's candidates to rank 0: the gathered tensors, or None where the
        answers are already in memory rank 0 reads (and on the other ranks)."""
    def wait_all(self) -> None: ...
    def ready(self) -> None: ...
    def handoff_send(self, rows: torch.Tensor, dst: int) -> "dist.Work | None": ...
    def handoff_recv(self, buf: torch.Tensor, src: int) -> None: ...
    def close(self) -> None: ...


class CollectiveTransport:
    """torch.distributed collectives and point-to-point sends. Commands travel on
    a CPU (gloo) group with no practical timeout, so idle explorers wait as long
    as the worker does; the round's tensors use the default group (NCCL on CUDA)
    and its timeout. Call after `init_process_group`, on every rank."""

    shares_hidden = False

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.control = dist.new_group(backend="gloo", timeout=IDLE)

    def broadcast(self, payload: torch.Tensor) -> None:
        """`payload` is a CPU tensor on every rank."""
        dist.broadcast(payload, 0, group=self.control)

    def gather(self, cand: torch.Tensor) -> list[torch.Tensor] | None:
        if self.rank:
            dist.gather(cand, None, dst=0)
            return None
        out = [torch.empty_like(cand) for _ in range(self.world)]
        dist.gather(cand, out, dst=0)
        return out

    def wait_all(self) -> None:
        """Ranks process commands in order; a later collective waits for them."""

    def ready(self) -> None:
        """The first command waits on the control group, which has no timeout."""

    def handoff_send(self, rows: torch.Tensor, dst: int) -> "dist.Work":
        """Asynchronous: every explorer sends before it receives; wait on the handle."""
        return dist.isend(rows.contiguous(), dst)

    def handoff_recv(self, buf: torch.Tensor, src: int) -> None:
        dist.recv(buf, src)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# spin-then-block: how long a waiting side polls its shared counter before it
# sleeps on a semaphore. A round's answer usually comes within a segment's time,
# and a sleep adds a scheduler wake-up (tens of microseconds) to every round.
SPIN_S = 2e-3


def _fence(lock=threading.Lock()) -> None:
    """A full memory barrier (a locked instruction) between our store to a flag
    and our load of the other side's flag, so no wake-up is lost."""
    lock.acquire()
    lock.release()


@dataclasses.dataclass
class SharedRound:
    """What the coordinator creates before starting the explorer processes and
    hands to each (shared tensors and semaphores survive `spawn`)."""

    plan: torch.Tensor          # int64 [payload]: the current command
    cand: torch.Tensor          # int64 [K, Wmax, M]: each explorer's ranked candidates
    hidden: torch.Tensor        # [hidden rows, H]: the hidden-state buffer all explorers share
    sig: torch.Tensor           # int64 counters and flags, layout below
    go: list                    # per rank: wakes a rank sleeping on the next command
    done: object                # wakes the coordinator sleeping on the answers
    handoff: list               # per rank: its predecessor's prefill rows are in `hidden`

    # sig layout: [0] command sequence number (the coordinator's), [1 + r] the last
    # command rank r finished (-1: not started), [1 + K + r] rank r sleeps on `go`,
    # [1 + 2K] the coordinator sleeps on `done`
    @classmethod
    def create(cls, payload: int, explorers: int, wmax: int, candidates: int, hidden_rows: int, hidden: int,
               dtype: torch.dtype) -> "SharedRound":
        ctx = mp.get_context("spawn")
        sig = torch.zeros(2 + 2 * explorers, dtype=torch.long)
        sig[1:1 + explorers] = -1
        return cls(plan=torch.zeros(payload, dtype=torch.long).share_memory_(),
                   cand=torch.zeros(explorers, wmax, candidates, dtype=torch.long).share_memory_(),
                   hidden=torch.zeros(hidden_rows, hidden, dtype=dtype).share_memory_(),
                   sig=sig.share_memory_(),
                   go=[ctx.Semaphore(0) for _ in range(explorers)],
                   done=ctx.Semaphore(0),
                   handoff=[ctx.Semaphore(0) for _ in range(explorers)])


class SharedMemoryTransport:
    """Same-host CPU explorers: data in shared memory; a command is announced by
    bumping a sequence counter, an answer by copying it into the rank's own
    counter. The waiting side spins on the counter for `SPIN_S` (yielding the
    core between polls when there are more processes than cores), then sleeps
    on a semaphore after raising its sleep flag; the other side posts that
    semaphore only when the flag is up, so a busy round makes no system call."""

    shares_hidden = True

    def __init__(self, rank: int, world: int, shared: SharedRound, alive: Callable[[], None],
                 timeout: timedelta = TIMEOUT, spin_s: float | None = None) -> None:
        """`alive()` raises `PeerLost` when a peer is gone (the coordinator checks
        its children; an explorer checks that its coordinator still exists)."""
        self.rank, self.world, self.shared = rank, world, shared
        self.alive = alive
        self.timeout = timeout.total_seconds()
        self.sig = shared.sig.numpy()
        self.seq = 0  # the last command sent (coordinator) or taken (explorer)
        self.spin_s = SPIN_S if spin_s is None else spin_s
        self.DONE, self.SLEEP, self.COORD_SLEEP = 1, 1 + world, 1 + 2 * world

    def _spin(self, ready: Callable[[], bool]) -> bool:
        if ready():
            return True
        if self.spin_s <= 0:
            return False
        # yield the core between polls: on an idle host sched_yield returns at once; on a busy one
        # (more runnable processes than cores) a pure spin holds the core the answering peer needs
        clock, yield_ = time.perf_counter, os.sched_yield
        end = clock() + self.spin_s
        while True:
            for _ in range(50):
                if ready():
                    return True
                yield_()
            if clock() > end:
                return ready()

    def _sleep(self, ready: Callable[[], bool], flag: int, sem, limit: float | None) -> None:
        """Block on `sem` until `ready()`, checking peers every POLL_S."""
        sig = self.sig
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            sig[flag] = 1
            _fence()
            if ready():
                sig[flag] = 0
                return
            sem.acquire(timeout=POLL_S)  # a stale post only costs one more turn of this loop
            sig[flag] = 0
            if ready():
                return
            self.alive()
            if deadline is not None and time.monotonic() > deadline:
                raise PeerLost(f"no answer within {limit:.0f} s")

    def broadcast(self, payload: torch.Tensor) -> None:
        sig = self.sig
        if self.rank == 0:
            if payload.data_ptr() != self.shared.plan.data_ptr():
                self.shared.plan.copy_(payload)
            self.seq += 1
            sig[0] = self.seq  # after the payload: x86 stores are seen in program order
            _fence()
            for r in range(1, self.world):
                if sig[self.SLEEP + r]:
                    self.shared.go[r].release()
        else:
            want = self.seq + 1
            ready = lambda: sig[0] >= want  # noqa: E731
            if not self._spin(ready):
                self._sleep(ready, self.SLEEP + self.rank, self.shared.go[self.rank], None)  # idle: no limit
            self.seq = want
            if payload.data_ptr() != self.shared.plan.data_ptr():
                payload.copy_(self.shared.plan)

    def gather(self, cand: torch.Tensor) -> list[torch.Tensor] | None:
        mine = self.shared.cand[self.rank]
        if cand.data_ptr() != mine.data_ptr():
            mine.copy_(cand)
        if self.rank:
            self._answer()
            return None
        self.wait_all()
        return None   # every rank's answer is in `shared.cand` already

    def _answer(self) -> None:
        sig = self.sig
        sig[self.DONE + self.rank] = self.seq
        _fence()
        if sig[self.COORD_SLEEP]:
            self.shared.done.release()

    def wait_all(self, limit: timedelta | None = None) -> None:
        """Ranks: answer. Coordinator: wait for every answer (`limit`: default the timeout)."""
        if self.rank:
            self._answer()
            return
        sig, seq, lo, hi = self.sig, self.seq, self.DONE + 1, self.DONE + self.world
        ready = lambda: bool((sig[lo:hi] == seq).all()) if hi - lo > 1 else sig[lo] == seq  # noqa: E731
        if not self._spin(ready):
            self._sleep(ready, self.COORD_SLEEP, self.shared.done, limit.total_seconds() if limit else self.timeout)

    def ready(self) -> None:
        """Start-up handshake: explorers say they have loaded (answer command 0);
        the coordinator waits up to STARTUP for all of them (loading and
        compiling take longer than a round)."""
        self.wait_all(STARTUP)

    def handoff_send(self, rows: torch.Tensor, dst: int) -> None:
        """The rows are already in the shared hidden buffer: only signal."""
        self.shared.handoff[dst].release()
        return None

    def handoff_recv(self, buf: torch.Tensor, src: int) -> None:
        sem = self.shared.handoff[self.rank]
        deadline = time.monotonic() + self.timeout
        while not sem.acquire(timeout=POLL_S):
            self.alive()
            if time.monotonic() > deadline:
                raise PeerLost(f"no answer within {self.timeout:.0f} s")

    def close(self) -> None:
        pass


def parent_watch() -> Callable[[], None]:
    """For an explorer process: raises PeerLost once its coordinator is gone."""
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            raise PeerLost("the coordinator process is gone")
    return check
