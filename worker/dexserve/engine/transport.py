"""How explorer processes exchange a round: the plan out, candidates back, and
hidden states from explorer k to k+1.

`CollectiveTransport` is torch.distributed: gloo on CPU, NCCL on CUDA, across
hosts under torchrun. On one host with CPU explorers the round's messages are a
few kilobytes and gloo's TCP round trips cost more than a segment's compute, so
`SharedMemoryTransport` keeps the plan, the candidates and the hidden-state
buffer itself in shared memory and only signals with semaphores: explorer k
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
    def gather(self, cand: torch.Tensor) -> list[torch.Tensor] | None: ...
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


@dataclasses.dataclass
class SharedRound:
    """What the coordinator creates before starting the explorer processes and
    hands to each (shared tensors and semaphores survive `spawn`)."""

    plan: torch.Tensor          # int64 [payload]: the current command
    cand: torch.Tensor          # int64 [K, Wmax, M]: each explorer's ranked candidates
    hidden: torch.Tensor        # [hidden rows, H]: the hidden-state buffer all explorers share
    go: list                    # per rank: a command is waiting
    done: list                  # per rank: the rank finished the command
    handoff: list               # per rank: its predecessor's prefill rows are in `hidden`

    @classmethod
    def create(cls, payload: int, explorers: int, wmax: int, candidates: int, hidden_rows: int, hidden: int,
               dtype: torch.dtype) -> "SharedRound":
        ctx = mp.get_context("spawn")
        return cls(plan=torch.zeros(payload, dtype=torch.long).share_memory_(),
                   cand=torch.zeros(explorers, wmax, candidates, dtype=torch.long).share_memory_(),
                   hidden=torch.zeros(hidden_rows, hidden, dtype=dtype).share_memory_(),
                   go=[ctx.Semaphore(0) for _ in range(explorers)],
                   done=[ctx.Semaphore(0) for _ in range(explorers)],
                   handoff=[ctx.Semaphore(0) for _ in range(explorers)])


class SharedMemoryTransport:
    """Same-host CPU explorers: data in shared memory, signals through semaphores."""

    shares_hidden = True

    def __init__(self, rank: int, world: int, shared: SharedRound, alive: Callable[[], None],
                 timeout: timedelta = TIMEOUT) -> None:
        """`alive()` raises `PeerLost` when a peer is gone (the coordinator checks
        its children; an explorer checks that its coordinator still exists)."""
        self.rank, self.world, self.shared = rank, world, shared
        self.alive = alive
        self.timeout = timeout.total_seconds()

    def _wait(self, sem, limit: float | None) -> None:
        """Take `sem`, checking peers every POLL_S; `limit` seconds at most (None: no limit)."""
        # a short spin first: the answer usually comes within a segment's time,
        # and a blocked wait adds a scheduler wake-up to every round
        for _ in range(2000):
            if sem.acquire(False):
                return
        deadline = None if limit is None else time.monotonic() + limit
        while not sem.acquire(timeout=POLL_S):
            self.alive()
            if deadline is not None and time.monotonic() > deadline:
                raise PeerLost(f"no answer within {limit:.0f} s")

    def broadcast(self, payload: torch.Tensor) -> None:
        if self.rank == 0:
            if payload.data_ptr() != self.shared.plan.data_ptr():
                self.shared.plan.copy_(payload)
            for r in range(1, self.world):
                self.shared.go[r].release()
        else:
            self._wait(self.shared.go[self.rank], None)  # idle until the next command
            if payload.data_ptr() != self.shared.plan.data_ptr():
                payload.copy_(self.shared.plan)

    def gather(self, cand: torch.Tensor) -> list[torch.Tensor] | None:
        self.shared.cand[self.rank].copy_(cand)
        if self.rank:
            self.shared.done[self.rank].release()
            return None
        self.wait_all()
        return list(self.shared.cand.unbind(0))

    def wait_all(self, limit: timedelta | None = None) -> None:
        """Ranks: answer. Coordinator: wait for every answer (`limit`: default the timeout)."""
        if self.rank:
            self.shared.done[self.rank].release()
            return
        seconds = (limit.total_seconds() if limit else self.timeout)
        for r in range(1, self.world):
            self._wait(self.shared.done[r], seconds)

    def ready(self) -> None:
        """Start-up handshake: explorers say they have loaded; the coordinator waits
        up to STARTUP for all of them (loading and compiling take longer than a round)."""
        self.wait_all(STARTUP)

    def handoff_send(self, rows: torch.Tensor, dst: int) -> None:
        """The rows are already in the shared hidden buffer: only signal."""
        self.shared.handoff[dst].release()
        return None

    def handoff_recv(self, buf: torch.Tensor, src: int) -> None:
        self._wait(self.shared.handoff[self.rank], self.timeout)

    def close(self) -> None:
        pass


def parent_watch() -> Callable[[], None]:
    """For an explorer process: raises PeerLost once its coordinator is gone."""
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            raise PeerLost("the coordinator process is gone")
    return check
