"""One explorer inside its process: `_Rank` (rank k runs explorer k+1) and the
process entry the coordinator spawns (`explorer_process`)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dexserve.engine.distributed.wire import (CMD_PREFILL, CMD_ROUND, CMD_SAMPLING, CMD_STOP, ExplorerSettings,
                                              PlanCodec, i2f)
from dexserve.engine.executor import ExecutorSpec, RowPacker, StepRunner, prefill_need, settle, warm_up
from dexserve.engine.model import load_weights, rotary_tables
from dexserve.contract.model_card import ModelCard
from dexserve.engine.step import ExplorerStep
from dexserve.engine.transport import CollectiveTransport, SharedMemoryTransport, SharedRound, Transport, parent_watch


def rank_device(rank: int, device: str) -> torch.device:
    """Where rank `rank`'s explorer runs: the host, or its own GPU. Under torchrun that GPU is the
    rank's index on its own host (LOCAL_RANK: ranks on other hosts count from 0 there); explorer
    processes this host spawned number their GPUs by rank."""
    if device == "cpu":
        return torch.device("cpu")
    env = os.environ
    torchrun = "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env
    return torch.device(f"cuda:{int(env['LOCAL_RANK']) if torchrun else rank}")


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


# How long the processes may take to meet: spawning one means importing torch and loading its
# layers, which on a busy host takes far longer than an explorer may take to answer (`timeout`).
RENDEZVOUS_TIMEOUT = timedelta(seconds=120)


def init_group(rank: int, world: int, port: int, device: str, timeout: timedelta) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=max(timeout, RENDEZVOUS_TIMEOUT))
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=timeout)


@dataclasses.dataclass
class _Rank:
    """One explorer's state inside its process."""

    rank: int
    spec: ExecutorSpec
    step: object          # ExplorerStep, or NullStep
    runner: object        # StepRunner, or NullRunner
    prefill_runner: object
    codec: PlanCodec
    device: torch.device
    transport: Transport
    payload: torch.Tensor       # CPU int64 [codec.size]: shared, or this rank's broadcast target
    cand: torch.Tensor          # [Wmax, M]: where this rank's candidates go
    step_seconds: float = 0.0   # wall time of this explorer's own steps (CPU: synchronous)
    step_calls: int = 0

    @classmethod
    def build(cls, rank: int, card: ModelCard, spec: ExecutorSpec, transport: Transport,
              payload: torch.Tensor, cand: torch.Tensor, hidden: torch.Tensor | None = None) -> "_Rank":
        device = rank_device(rank, spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        spec = dataclasses.replace(spec, device=str(device))
        b = spec.buffers
        if spec.null_step:
            from dexserve.engine.nullstep import NullRunner, NullStep

            step = NullStep(b, hidden)
            runner = NullRunner(spec.widths[rank], rank + 1, spec.explorers, spec.candidates, card.vocab_size, b)
            prefill_runner = NullRunner(b.prefill_rows, rank + 1, spec.explorers, spec.candidates,
                                        card.vocab_size, b)
        else:
            weights = load_weights(card, spec.layers(rank), need_embed=(rank == 0), dtype=spec.dtype, device=device,
                                   adapters=spec.adapters and spec.adapters.path)
            cos, sin = rotary_tables(card, b.max_context, dtype=spec.dtype, device=device)
            step = ExplorerStep(weights, spec.layers(rank), b, cos, sin, spec.candidates,
                                first=(rank == 0), device=device, dtype=spec.dtype, hidden=hidden)
            runner = StepRunner(step, spec.widths[rank], spec)
            prefill_runner = StepRunner(step, b.prefill_rows, spec, prefill=True)
            warm_up([runner], [prefill_runner])
        return cls(rank, spec, step, runner, prefill_runner, PlanCodec(spec), device, transport, payload, cand)

    def __post_init__(self) -> None:
        self.views = self.codec.views(self.payload)
        self.on_host = self.device.type == "cpu"
        self.cand_host = self.cand.numpy() if self.cand.device.type == "cpu" else None
        self.world = self.spec.explorers
        self.handing = not self.transport.shares_hidden
        self.prefill_rows = RowPacker.buffer(self.spec.buffers, self.spec.buffers.prefill_rows)

    def round(self) -> torch.Tensor:
        """Run this explorer's part of the round in the payload; its ranked
        candidates land in `self.cand` (returned)."""
        if torch.is_grad_enabled():   # (explorer processes run with grad off: no context per round)
            with torch.no_grad():
                return self._round()
        return self._round()

    def _round(self) -> torch.Tensor:
        c, k, v = self.codec, self.rank, self.views
        h = v.header.tolist()
        n_retire = h[c.RETIRE]
        if n_retire:
            if self.on_host:   # numpy views of the payload: no tensor slicing on the hot path
                self.step.retire(v.retire[0, :n_retire], v.retire[1, :n_retire])
            else:
                r = v.retire_t[:, :n_retire].to(self.device, non_blocking=True)
                self.step.retire(r[0], r[1])
        sent = None
        if h[c.COUNTS + k]:
            t0 = time.perf_counter()
            out = self.runner(v.inputs[k], bool(h[c.SAMPLED]), h[c.SPANS + k], h[c.COUNTS + k],
                              bool(h[c.LOGPROBS]) and k + 1 == self.world)
            self.step_seconds += time.perf_counter() - t0
            self.step_calls += 1
            if self.cand_host is not None:   # (host candidates: the step ran on the host)
                rows, cols = out.shape
                self.cand_host[:rows, :cols] = out.numpy()
            else:
                self.cand[: out.shape[0], : out.shape[1]].copy_(out)
            if self.handing and k + 1 < self.world:
                rows = self.step.hidden.index_select(0, v.inputs[k].slot.to(self.device, non_blocking=True))
                sent = self.transport.handoff_send(rows, k + 1)
        if self.handing and k > 0 and h[c.COUNTS + k - 1]:
            buf = torch.empty(self.spec.widths[k - 1], self.step.dims.hidden, dtype=self.spec.dtype,
                              device=self.device)
            self.transport.handoff_recv(buf, k - 1)
            self.step.hidden.index_copy_(0, v.inputs[k - 1].slot.to(self.device, non_blocking=True), buf)
        if sent is not None:
            sent.wait()
        return self.cand

    @torch.no_grad()
    def prefill(self) -> None:
        """The command's prompt chunks in order; hidden states flow down the
        pipe chunk by chunk, so explorer k works on chunk c while explorer k+1
        works on chunk c-1 (each chunk has its own hidden rows). A chunk's rows
        are copied into this rank's own prefill array: the compiled step always
        reads the same tensors."""
        P = self.spec.buffers.prefill_rows
        m, inputs = self.prefill_rows
        part = int(self.views.header[2]) - 1
        if part >= 0:
            self._prefill_part(part)
        else:
            self._prefill_chunks(P, m, inputs)
        settle(self.device)   # answered only once the chunk's kernels ran: the engine times prefill

    def _prefill_chunks(self, P: int, m, inputs) -> None:
        for c in range(int(self.views.header[1])):
            m[:] = self.views.prefill_rows[c]
            slots = inputs.slot.to(self.device, non_blocking=True)
            if self.rank > 0:
                buf = (torch.empty(P, self.step.dims.hidden, dtype=self.spec.dtype, device=self.device)
                       if self.handing else self.step.hidden[:0])  # shared buffer: the rows are already in place
                self.transport.handoff_recv(buf, self.rank - 1)
                if self.handing:
                    self.step.hidden.index_copy_(0, slots, buf)
            self.prefill_runner(inputs, sampled=False, span=self.prefill_runner.span(prefill_need(m)))
            if self.rank + 1 < self.world:
                rows = self.step.hidden.index_select(0, slots) if self.handing else self.step.hidden[:0]
                sent = self.transport.handoff_send(rows, self.rank + 1)
                if sent is not None:
                    sent.wait()

    def _prefill_part(self, part: int) -> None:
        """Explorer `part`'s layers of the chunk in region 0; the other explorers
        idle, except that over a collective transport explorer part-1 hands over
        the hidden rows its own part left (shared memory already holds them)."""
        m, inputs = self.prefill_rows
        if self.rank not in (part - 1, part) or (self.rank < part and not self.handing):
            return
        m[:] = self.views.prefill_rows[0]
        slots = inputs.slot.to(self.device, non_blocking=True)
        if self.rank < part:
            sent = self.transport.handoff_send(self.step.hidden.index_select(0, slots), part)
            if sent is not None:
                sent.wait()
            return
        if self.handing and part > 0:
            buf = torch.empty(len(m), self.step.dims.hidden, dtype=self.spec.dtype, device=self.device)
            self.transport.handoff_recv(buf, part - 1)
            self.step.hidden.index_copy_(0, slots, buf)
        self.prefill_runner(inputs, sampled=False, span=self.prefill_runner.span(prefill_need(m)))

    def sampling(self) -> None:
        index, temp, top_k, top_p, seed = self.views.header[1:6].tolist()
        self.step.set_sampling(int(index), i2f(int(temp)), int(top_k), i2f(int(top_p)), int(seed))

    def serve(self) -> None:
        """Ranks > 0: follow the coordinator's commands until told to stop.
        The payload is host data; index tensors move to the device as the step
        needs them."""
        while True:
            self.transport.broadcast(self.payload)
            cmd = int(self.views.array[0])
            if cmd == CMD_STOP:
                return
            if cmd == CMD_ROUND:
                self.transport.gather(self.round())
                continue
            if cmd == CMD_PREFILL:
                self.prefill()
            elif cmd == CMD_SAMPLING:
                self.sampling()
            self.transport.wait_all()


def run_rank(rank: int, settings: ExplorerSettings, transport: Transport, shared: SharedRound | None) -> None:
    """Build rank `rank`'s explorer, say it is ready, serve until told to stop.
    (An explorer process only runs inference: grad mode is off for good.)"""
    torch.set_grad_enabled(False)
    codec = PlanCodec(settings.spec)
    if shared is not None:
        payload, cand, hidden = shared.plan, shared.cand[rank], shared.hidden
    else:
        payload = torch.zeros(codec.size, dtype=torch.long)
        cand = torch.zeros(max(settings.spec.widths), codec.cand_width, dtype=torch.long,
                           device=rank_device(rank, settings.spec.device))
        hidden = None
    me = _Rank.build(rank, ModelCard.load(settings.model_path), settings.spec, transport, payload, cand, hidden)
    transport.ready()
    me.serve()


def explorer_process(rank: int, world: int, port: int, settings: ExplorerSettings,
                     shared: SharedRound | None) -> None:
    """Entry of an explorer process the coordinator spawned (not torchrun)."""
    settings.apply()
    if settings.spec.device.startswith("cuda"):
        torch.cuda.set_device(rank_device(rank, settings.spec.device))   # before NCCL starts: its communicators
                                                                          # belong to this rank's GPU
    if shared is None:
        init_group(rank, world, port, settings.spec.device, settings.timeout)
        transport: Transport = CollectiveTransport(rank, world)
    else:
        transport = SharedMemoryTransport(rank, world, shared, parent_watch(), settings.timeout)
    code = 0
    try:
        run_rank(rank, settings, transport, shared)
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
