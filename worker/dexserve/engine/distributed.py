"""Depth explorers on K devices: one process per explorer.

Rank k runs explorer k+1: it loads only its own layers (rank 0 also the
embedding; every rank the shared norm and head, since every boundary reads
out) and holds only its layers' slice of the KV buffers. Rank 0 is also the
coordinator: it owns the lattice, broadcasts each round's plan as one packed
int64 tensor, runs explorer 1, and gathers every explorer's ranked candidates.
Explorer k's hidden states reach explorer k+1 for a later round. All explorers
of a round run at the same time; a round costs the slowest segment plus the
plan, the hand-off and the gather.

How those travel is the transport (`dexserve.engine.transport`): shared memory
and semaphores for CPU explorers on this host (the hidden-state buffer itself
is shared, so there is no hand-off message), torch.distributed otherwise (gloo
on CPU, NCCL on CUDA with rank k on cuda:k). The worker starts the explorer
processes itself; under torchrun (RANK/WORLD_SIZE set) rank 0 is the worker and
ranks > 0 run `python -m dexserve.engine.distributed`. A dead explorer surfaces
as `ExplorerFailure`; `restart()` brings up a fresh set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import struct
import sys
import time
from datetime import timedelta
from typing import Literal, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dexserve.engine.executor import ExecutorFailure, ExecutorSpec, RowPacker, StepRunner, plan_samples, warm_up
from dexserve.engine.lattice import Plan, Readout
from dexserve.engine.model import load_weights, rotary_tables
from dexserve.contract.model_card import ModelCard
from dexserve.contract.request import SamplingParams
from dexserve.engine.step import ExplorerStep, StepInputs
from dexserve.engine.transport import (TIMEOUT, CollectiveTransport, SharedMemoryTransport, SharedRound, Transport,
                                       TransportKind, parent_watch)

CMD_ROUND, CMD_PREFILL, CMD_SAMPLING, CMD_STOP = 1, 2, 3, 4
FIELDS = 7  # token, position, slot, kv_row, request, lo, hi (+ A ancestor rows)


class ExplorerFailure(ExecutorFailure):
    """An explorer process died or stopped answering."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


class PlanCodec:
    """Packs a round (per-explorer step inputs, retire copies) into one static int64 tensor."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        # header: cmd, rows per explorer (K), retire count, sampled flag, attention span per
        # explorer (K); or a command's arguments
        self.header = max(8, 2 * spec.explorers + 3)
        A = spec.buffers.ancestors
        self.row = FIELDS + A
        self.sizes = [w * self.row for w in spec.widths]
        self.retire_max = spec.buffers.max_batch
        self.prefill_size = spec.buffers.prefill_rows * self.row
        self.round_size = self.header + sum(self.sizes) + 2 * self.retire_max
        self.size = max(self.round_size, self.header + self.prefill_size)

    @staticmethod
    def pack_inputs(x: StepInputs) -> torch.Tensor:
        cols = [x.token, x.position, x.slot, x.kv_row, x.request, x.lo, x.hi]
        return torch.cat([torch.stack(cols, dim=1), x.anc], dim=1).reshape(-1)

    def unpack_inputs(self, flat: torch.Tensor, width: int) -> StepInputs:
        m = flat.view(width, self.row)
        return StepInputs(*(m[:, i] for i in range(FIELDS)), anc=m[:, FIELDS:])


@dataclasses.dataclass
class _Rank:
    """One explorer's state inside its process."""

    rank: int
    spec: ExecutorSpec
    step: ExplorerStep
    runner: StepRunner
    prefill_runner: StepRunner
    codec: PlanCodec
    device: torch.device
    transport: Transport
    step_seconds: float = 0.0  # wall time of this explorer's own steps (CPU: synchronous)
    step_calls: int = 0

    @classmethod
    def build(cls, rank: int, card: ModelCard, spec: ExecutorSpec, transport: Transport,
              hidden: torch.Tensor | None = None) -> "_Rank":
        device = torch.device(spec.device if spec.device == "cpu" else f"cuda:{rank}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        spec = dataclasses.replace(spec, device=str(device))
        weights = load_weights(card, spec.layers(rank), need_embed=(rank == 0), dtype=spec.dtype, device=device)
        cos, sin = rotary_tables(card, spec.buffers.max_context, dtype=spec.dtype, device=device)
        step = ExplorerStep(weights, spec.layers(rank), spec.buffers, cos, sin, spec.candidates,
                            first=(rank == 0), device=device, dtype=spec.dtype, hidden=hidden)
        runner, prefill_runner = StepRunner(step, spec.widths[rank], spec), StepRunner(step, spec.buffers.prefill_rows, spec)
        warm_up([runner], [prefill_runner])
        return cls(rank, spec, step, runner, prefill_runner, PlanCodec(spec), device, transport)

    @property
    def world(self) -> int:
        return self.spec.explorers

    def slots_of(self, payload: torch.Tensor, k: int) -> torch.Tensor:
        off = self.codec.header + sum(self.codec.sizes[:k])
        return self.codec.unpack_inputs(payload[off:off + self.codec.sizes[k]], self.spec.widths[k]).slot

    @torch.no_grad()
    def round(self, payload: torch.Tensor) -> torch.Tensor:
        """Run this explorer's part of a round; returns its ranked candidates [Wmax, M]."""
        counts = payload[1:1 + self.world].tolist()
        n_retire = int(payload[1 + self.world])
        sampled = bool(payload[2 + self.world])
        span = int(payload[3 + self.world + self.rank])
        if n_retire:
            off = self.codec.header + sum(self.codec.sizes)
            r = payload[off:off + 2 * self.codec.retire_max].view(2, self.codec.retire_max)[:, :n_retire]
            r = r.to(self.device, non_blocking=True)
            self.step.retire(r[0], r[1])
        k = self.rank
        wmax = max(self.spec.widths)
        cand = torch.zeros(wmax, self.spec.candidates, dtype=torch.long, device=self.device)
        handing = not self.transport.shares_hidden
        sent = None
        if counts[k]:
            off = self.codec.header + sum(self.codec.sizes[:k])
            inputs = self.codec.unpack_inputs(payload[off:off + self.codec.sizes[k]], self.spec.widths[k])
            t0 = time.perf_counter()
            out = self.runner(inputs, sampled, span)
            self.step_seconds += time.perf_counter() - t0
            self.step_calls += 1
            cand[: out.shape[0]] = out
            if handing and k + 1 < self.world:
                rows = self.step.hidden.index_select(0, inputs.slot.to(self.device, non_blocking=True))
                sent = self.transport.handoff_send(rows, k + 1)
        if handing and k > 0 and counts[k - 1]:
            buf = torch.empty(self.spec.widths[k - 1], self.step.dims.hidden, dtype=self.spec.dtype, device=self.device)
            self.transport.handoff_recv(buf, k - 1)
            self.step.hidden.index_copy_(0, self.slots_of(payload, k - 1).to(self.device, non_blocking=True), buf)
        if sent is not None:
            sent.wait()
        return cand

    @torch.no_grad()
    def prefill(self, payload: torch.Tensor) -> None:
        """Prefill runs the explorers in sequence: hidden states flow down the pipe."""
        P = self.spec.buffers.prefill_rows
        inputs = self.codec.unpack_inputs(payload[self.codec.header:self.codec.header + self.codec.prefill_size], P)
        slots = inputs.slot.to(self.device, non_blocking=True)
        handing = not self.transport.shares_hidden
        if self.rank > 0:
            buf = (torch.empty(P, self.step.dims.hidden, dtype=self.spec.dtype, device=self.device) if handing
                   else self.step.hidden[:0])  # shared buffer: the rows are already in place
            self.transport.handoff_recv(buf, self.rank - 1)
            if handing:
                self.step.hidden.index_copy_(0, slots, buf)
        self.prefill_runner(inputs, sampled=False, span=int(payload[1]))
        if self.rank + 1 < self.world:
            rows = self.step.hidden.index_select(0, slots) if handing else self.step.hidden[:0]
            sent = self.transport.handoff_send(rows, self.rank + 1)
            if sent is not None:
                sent.wait()

    def sampling(self, payload: torch.Tensor) -> None:
        index, temp, top_k, top_p, seed = payload[1:6].tolist()
        self.step.set_sampling(int(index), _i2f(int(temp)), int(top_k), _i2f(int(top_p)), int(seed))

    def serve(self, payload: torch.Tensor) -> None:
        """Ranks > 0: follow the coordinator's commands until told to stop.
        `payload` is a CPU tensor: commands are host data; index tensors move to
        the device as the step needs them."""
        while True:
            self.transport.broadcast(payload)
            cmd = int(payload[0])
            if cmd == CMD_STOP:
                return
            if cmd == CMD_ROUND:
                self.transport.gather(self.round(payload))
                continue
            if cmd == CMD_PREFILL:
                self.prefill(payload)
            elif cmd == CMD_SAMPLING:
                self.sampling(payload)
            self.transport.wait_all()


def _init(rank: int, world: int, addr: str, port: int, backend: str, timeout: timedelta) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)


def _explorer_process(rank: int, world: int, port: int, model_path: str, spec: ExecutorSpec, threads: int,
                      shared: SharedRound | None, timeout: timedelta) -> None:
    torch.set_num_threads(threads)
    if shared is None:
        _init(rank, world, "127.0.0.1", port, "nccl" if spec.device.startswith("cuda") else "gloo", timeout)
        transport: Transport = CollectiveTransport(rank, world)
        payload = None
    else:
        transport = SharedMemoryTransport(rank, world, shared, parent_watch(), timeout)
        payload = shared.plan
    code = 0
    try:
        me = _Rank.build(rank, ModelCard.load(model_path), spec, transport,
                         hidden=None if shared is None else shared.hidden)
        transport.ready()
        me.serve(payload if payload is not None else torch.zeros(me.codec.size, dtype=torch.long))
    except Exception:  # noqa: BLE001 - the coordinator sees the failure as ExplorerFailure
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        transport.close()
    # skip interpreter teardown: the backend's threads must not outlive it (std::terminate)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_transport(kind: TransportKind, device: str) -> Literal["shm", "torch"]:
    """auto: shared memory for CPU explorers this process starts; torch.distributed
    for CUDA and under torchrun (other hosts)."""
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
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
        """`timeout`: how long the coordinator waits for an explorer's answer
        within a command (idle explorers wait for the next command forever)."""
        if spec.explorers < 2:
            raise ValueError("the distributed executor needs at least 2 explorers")
        self.card = card
        self.spec = spec
        self.threads = threads or 1
        self.transport_kind = resolve_transport(transport, spec.device)
        self.timeout = timeout
        self.codec = PlanCodec(spec)
        self.procs: list[mp.process.BaseProcess] = []
        self._start()

    # ---- lifecycle -------------------------------------------------------
    def _start(self) -> None:
        from dexserve.engine.model import ModelDims

        world = self.spec.explorers
        dims = ModelDims.from_config(self.card.config)
        shared = None
        if self.transport_kind == "shm":
            b = self.spec.buffers
            shared = SharedRound.create(self.codec.size, world, max(self.spec.widths), self.spec.candidates,
                                        b.hidden_rows, dims.hidden, self.spec.dtype)
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if torchrun:
            dist.init_process_group("nccl" if self.spec.device.startswith("cuda") else "gloo", timeout=self.timeout)
        else:
            port = _free_port()
            ctx = mp.get_context("spawn")
            self.procs = [ctx.Process(target=_explorer_process, daemon=True, name=f"dex-explorer-{r}",
                                      args=(r, world, port, str(self.card.path), self.spec, self.threads, shared,
                                            self.timeout))
                          for r in range(1, world)]
            for p in self.procs:
                p.start()
            if shared is None:
                _init(0, world, "127.0.0.1", port, "nccl" if self.spec.device.startswith("cuda") else "gloo",
                      self.timeout)
        if shared is None:
            self.transport: Transport = CollectiveTransport(0, world)
        else:
            self.transport = SharedMemoryTransport(0, world, shared, self._check_alive, self.timeout)
        self.local = _Rank.build(0, self.card, self.spec, self.transport,
                                 hidden=None if shared is None else shared.hidden)
        self.transport.ready()
        self.packer = RowPacker(self.spec.buffers, dims.sliding_window)
        self.payload = shared.plan if shared is not None else torch.zeros(self.codec.size, dtype=torch.long)
        self.sampled = [False] * self.spec.buffers.max_batch

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
        self.payload[0] = cmd
        self.transport.broadcast(self.payload)

    def set_sampling(self, index: int, params: SamplingParams) -> None:
        self._guard(self._set_sampling, index, params)

    def _set_sampling(self, index: int, params: SamplingParams) -> None:
        self.sampled[index] = not params.greedy
        self.payload.zero_()
        self.payload[1:6] = torch.tensor([index, _f2i(params.temperature), params.top_k, _f2i(params.top_p),
                                          params.seed & 0xFFFFFFFF])
        self._send(CMD_SAMPLING)
        self.local.sampling(self.payload)
        self.transport.wait_all()

    def prefill(self, index: int, token_ids: Sequence[int]) -> None:
        self._guard(self._prefill, index, token_ids)

    def _prefill(self, index: int, token_ids: Sequence[int]) -> None:
        P = self.spec.buffers.prefill_rows
        for start in range(0, len(token_ids), P):
            x = self.packer.prefill(index, token_ids[start:start + P], start, P)
            self.payload.zero_()
            self.payload[1] = self.local.prefill_runner.span(int((x.hi - x.lo).max()))
            self.payload[self.codec.header:self.codec.header + self.codec.prefill_size] = PlanCodec.pack_inputs(x)
            self._send(CMD_PREFILL)
            self.local.prefill(self.payload)
            self.transport.wait_all()

    def run(self, plan: Plan) -> Readout:
        return self._guard(self._run, plan)

    def _run(self, plan: Plan) -> Readout:
        K = self.spec.explorers
        flat = [torch.zeros(self.codec.header, dtype=torch.long)]
        flat[0][1:1 + K] = torch.tensor([len(r) for r in plan.rows])
        flat[0][1 + K] = len(plan.retire)
        flat[0][2 + K] = plan_samples(plan, self.sampled)
        for k, (rows, w) in enumerate(zip(plan.rows, self.spec.widths)):
            x = self.packer.lattice(rows, w)
            flat[0][3 + K + k] = self.local.runner.span(int((x.hi - x.lo).max()))
            flat.append(PlanCodec.pack_inputs(x))
        b = self.spec.buffers
        retire = torch.full((2, self.codec.retire_max), b.kv_scratch, dtype=torch.long)
        for i, r in enumerate(plan.retire):
            retire[0, i] = b.lattice_kv_row(r.slot)
            retire[1, i] = r.request_index * b.max_context + r.position
        flat.append(retire.reshape(-1))
        packed = torch.cat(flat)
        self.payload[: packed.numel()] = packed
        self._send(CMD_ROUND)
        gathered = self.transport.gather(self.local.round(self.payload))
        out = torch.stack(gathered).cpu().tolist()  # the one host sync of the round
        return Readout(tuple(tuple(tuple(c) for c in out[k][: len(rows)]) for k, rows in enumerate(plan.rows)))

    def _guard(self, fn, *args):
        self._check_alive()
        try:
            return fn(*args)
        except (RuntimeError, dist.DistBackendError) as exc:  # gloo/nccl raise on a dead peer
            self._check_alive()
            raise ExplorerFailure(f"explorer group failed: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    """torchrun entry for ranks > 0 (rank 0 is the worker with --executor distributed)."""
    from dexserve.engine.engine import DexEngine, EngineConfig

    p = argparse.ArgumentParser(description="a DEX explorer rank under torchrun")
    p.add_argument("--model", default=None)
    p.add_argument("--explorers", type=int, required=True)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    card = ModelCard.load(args.model)
    cfg = EngineConfig(explorers=args.explorers, width=args.width, max_context=args.max_context,
                       max_batch=args.max_batch, device=args.device)
    spec = DexEngine.executor_spec(card, cfg)
    rank = int(os.environ["RANK"])
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    transport = CollectiveTransport(rank, dist.get_world_size())
    try:
        me = _Rank.build(rank, card, spec, transport)
        transport.ready()
        me.serve(torch.zeros(me.codec.size, dtype=torch.long))
    finally:
        transport.close()


if __name__ == "__main__":
    main()
