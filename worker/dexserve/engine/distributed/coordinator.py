"""The coordinator (rank 0): `DistributedExecutor`, an `Executor` like the
reference one. It owns no decision: each round it writes the lattice's plan
into the payload, signals the explorers, runs explorer 1 itself, waits for
every explorer's candidates and hands them back as the `Readout`."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Literal, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dexserve.engine.distributed.explorer import _Rank, explorer_process, init_group, rank_device
from dexserve.engine.distributed.wire import (CMD_PREFILL, CMD_ROUND, CMD_SAMPLING, CMD_STOP, ExplorerSettings,
                                              PlanCodec, f2i)
from dexserve.engine.executor import ExecutorFailure, ExecutorSpec, RowPacker, check_prefill_part
from dexserve.engine.lattice import Plan, Readout
from dexserve.engine.model import ModelDims
from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import SamplingParams
from dexserve.engine.transport import (TIMEOUT, CollectiveTransport, SharedMemoryTransport, SharedRound, Transport,
                                       TransportKind)

# the executor's own phases of a round, accumulated in `DistributedExecutor.phase_seconds`
PHASES = ("pack", "signal", "local", "wait", "decode")


class ExplorerFailure(ExecutorFailure):
    """An explorer process died or stopped answering."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_transport(kind: TransportKind, device: str) -> Literal["shm", "torch"]:
    """auto: shared memory for CPU explorers this process starts; torch.distributed
    for CUDA and under torchrun (other hosts)."""
    torchrun = under_torchrun()
    if kind == "auto":
        return "torch" if torchrun or not device.startswith("cpu") else "shm"
    if kind == "shm" and (torchrun or not device.startswith("cpu")):
        raise ValueError("transport shm is for CPU explorers on this host; use torch (gloo/NCCL) "
                         "for CUDA devices or torchrun")
    if kind not in ("shm", "torch"):
        raise ValueError(f"unknown transport {kind!r} (auto, shm or torch)")
    return kind


class DistributedExecutor:
    """The coordinator side (rank 0), an `Executor` like the reference one."""

    def __init__(self, card: ModelCard, spec: ExecutorSpec, threads: int | None = None,
                 transport: TransportKind = "auto", timeout: timedelta = TIMEOUT) -> None:
        """`threads`: intra-op threads of every explorer (default: this process's
        count, i.e. what `--threads` set). `timeout`: how long the coordinator
        waits for an explorer's answer within a command (idle explorers wait
        for the next command forever)."""
        if spec.explorers < 2:
            raise ValueError("the distributed executor needs at least 2 explorers")
        self.card = card
        self.spec = spec
        self.threads = threads or torch.get_num_threads()
        self.transport_kind = resolve_transport(transport, spec.device)
        self.timeout = timeout
        self.codec = PlanCodec(spec)
        self.procs: list[mp.process.BaseProcess] = []
        self.phase_seconds = [0.0] * len(PHASES)
        self._start()

    @property
    def settings(self) -> ExplorerSettings:
        return ExplorerSettings(str(self.card.path), self.spec, self.threads, self.timeout)

    # ---- lifecycle -------------------------------------------------------
    def _start(self) -> None:
        spec, world = self.spec, self.spec.explorers
        dims = ModelDims.from_config(self.card.config)
        wmax = max(spec.widths)
        shared = None
        if self.transport_kind == "shm":
            b = spec.buffers
            shared = SharedRound.create(self.codec.size, world, wmax, self.codec.cand_width, b.hidden_rows,
                                        dims.hidden, spec.dtype)
        if under_torchrun():
            from dexserve.engine.distributed.torchrun import init_torchrun, share_settings

            init_torchrun(self.timeout)
            share_settings(self.settings)
        else:
            port = _free_port()
            ctx = mp.get_context("spawn")
            self.procs = [ctx.Process(target=explorer_process, daemon=True, name=f"dex-explorer-{r}",
                                      args=(r, world, port, self.settings, shared))
                          for r in range(1, world)]
            for p in self.procs:
                p.start()
            if shared is None:
                init_group(0, world, port, spec.device, self.timeout)
        if shared is None:
            self.transport: Transport = CollectiveTransport(0, world)
            payload = torch.zeros(self.codec.size, dtype=torch.long)
            cand = torch.zeros(wmax, self.codec.cand_width, dtype=torch.long,
                               device=rank_device(0, spec.device))
            self.cand_all = None
        else:
            self.transport = SharedMemoryTransport(0, world, shared, self._check_alive, self.timeout)
            payload, cand = shared.plan, shared.cand[0]
            self.cand_all = shared.cand.numpy()  # [K, Wmax, M], every explorer writes its own
        self.local = _Rank.build(0, self.card, spec, self.transport, payload, cand,
                                 hidden=None if shared is None else shared.hidden)
        self.payload, self.views = payload, self.local.views
        self.transport.ready()
        self.packer = RowPacker(spec.buffers, None if spec.null_step else dims.sliding_window)
        for m in self.views.rows:  # rows past a round's count are padding: scratch rows only
            m[:] = self.packer.pad_row
        self.filled = [0] * world
        self.sampled = [False] * spec.buffers.max_batch
        self._final_logprobs: list[list[int]] | None = None

    def restart(self) -> None:
        """Bring up a fresh set of explorers after a failure (lattice state is gone)."""
        self.close(graceful=False)
        self._start()

    def close(self, graceful: bool = True) -> None:
        if graceful and (self.transport_kind == "shm" or dist.is_initialized()):
            try:
                self._send(CMD_STOP)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        for p in self.procs:
            p.join(timeout=5 if graceful else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
        self.transport.close()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    # ---- Executor protocol ------------------------------------------------
    def _check_alive(self) -> None:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise ExplorerFailure(f"explorer process {', '.join(dead)} died")

    def _send(self, cmd: int) -> None:
        self.views.array[0] = cmd
        self.transport.broadcast(self.payload)

    def set_sampling(self, index: int, params: SamplingParams) -> None:
        self._guard(self._set_sampling, index, params)

    def _set_sampling(self, index: int, params: SamplingParams) -> None:
        self.sampled[index] = not params.greedy
        self.views.header[1:6] = [index, f2i(params.temperature), params.top_k, f2i(params.top_p),
                                  params.seed & 0xFFFFFFFF]
        self._send(CMD_SAMPLING)
        self.local.sampling()
        self.transport.wait_all()

    @property
    def prefill_parts(self) -> int:
        return self.spec.explorers

    def prefill(self, index: int, token_ids: Sequence[int], start: int = 0, part: int | None = None) -> None:
        if part is not None:
            check_prefill_part(part, len(token_ids), self.prefill_parts, self.spec.buffers.prefill_rows)
        self._guard(self._prefill, index, token_ids, start, part)

    def _prefill(self, index: int, token_ids: Sequence[int], start: int, part: int | None) -> None:
        """Positions start..start+len-1. Whole (`part` None): up to G chunks per
        command, which the explorers pipeline (explorer k on chunk c while
        explorer k+1 is on chunk c-1). `part` k: explorer k's layers of one chunk
        alone, in chunk 0's rows (part 0 packs them; the later parts read the same
        packed rows and the hidden rows part k-1 left, which no round touches)."""
        P, G = self.spec.buffers.prefill_rows, self.spec.buffers.prefill_chunks
        h = self.views.header
        if part is not None:
            if part == 0:
                self.packer.fill_prefill(self.views.prefill_rows[0], index, token_ids, start, 0)
            h[1], h[2] = 1, part + 1
            self._send(CMD_PREFILL)
            self.local.prefill()
            self.transport.wait_all()
            return
        for first in range(0, len(token_ids), G * P):
            ats = range(first, min(len(token_ids), first + G * P), P)
            for c, at in enumerate(ats):
                self.packer.fill_prefill(self.views.prefill_rows[c], index, token_ids[at:at + P], start + at, c)
            h[1], h[2] = len(ats), 0
            self._send(CMD_PREFILL)
            self.local.prefill()
            self.transport.wait_all()

    def run(self, plan: Plan, logprobs: bool = False) -> Readout:
        # (no liveness check before each round: a round that waits on a dead explorer
        # finds out there, and a collective to a dead peer raises)
        return self._guard(self._run, plan, logprobs, check=False)

    def final_logprobs(self) -> list[list[int]] | None:
        """The last round's final-depth log-probability columns, per final-depth plan row."""
        return self._final_logprobs

    def _run(self, plan: Plan, logprobs: bool = False) -> Readout:
        t0 = time.perf_counter()
        v, b = self.views, self.spec.buffers
        span = self.local.runner.span
        counts, spans = [], []
        for k, rows in enumerate(plan.rows):
            n, need = self.packer.fill(v.rows[k], rows, self.filled[k])
            self.filled[k] = n
            counts.append(n)
            spans.append(span(need))
        retire = plan.retire
        for i, r in enumerate(retire):
            v.retire[0, i] = b.lattice_kv_row(r.slot)
            v.retire[1, i] = r.request_index * b.max_context + r.position
        sampled = any(self.sampled) and any(self.sampled[r.request_index] for rows in plan.rows for r in rows)
        v.header[:self.codec.LOGPROBS + 1] = [CMD_ROUND, *counts, len(retire), sampled, *spans, logprobs]
        t1 = time.perf_counter()
        self.transport.broadcast(self.payload)
        t2 = time.perf_counter()
        cand = self.local.round()
        t3 = time.perf_counter()
        gathered = self.transport.gather(cand)
        t4 = time.perf_counter()
        if self.cand_all is not None:
            c = self.cand_all
        else:  # collective: one stacked copy to the host, the round's one sync
            c = torch.stack(gathered).cpu().numpy()
        C, last = self.spec.candidates, len(counts) - 1
        out = Readout(tuple(tuple(map(tuple, c[k, :n, :C].tolist())) for k, n in enumerate(counts)))
        self._final_logprobs = c[last, :counts[last], C:].tolist() if logprobs else None
        t5 = time.perf_counter()
        ps = self.phase_seconds
        ps[0] += t1 - t0
        ps[1] += t2 - t1
        ps[2] += t3 - t2
        ps[3] += t4 - t3
        ps[4] += t5 - t4
        return out

    def _guard(self, fn, *args, check: bool = True):
        if check:
            self._check_alive()
        try:
            return fn(*args)
        except (RuntimeError, dist.DistBackendError) as exc:  # gloo/nccl raise on a dead peer
            self._check_alive()
            raise ExplorerFailure(f"explorer group failed: {exc}") from exc
