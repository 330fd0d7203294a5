"""The DEX engine: requests in, committed tokens out, one lattice round per step.

It glues the lattice (decisions), an executor (tensors) and the text side
(tokenizer, stop strings, detokenization). The worker loop and the CLI drive
it the same way: `add` requests, call `step` until they finish.

What a restarted request reuses: nothing but its seed. Tokens are a pure
function of (model, prompt, sampling parameters, seed), whatever the mode,
width or executor, so a request restarted on another worker reproduces the
same tokens and texts, position by position.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch

from dexserve.engine.executor import Executor, ExecutorFailure, ExecutorSpec, ReferenceExecutor, even_boundaries
from dexserve.engine.lattice import Lattice, LatticeConfig, Policy
from dexserve.engine.model import ACTIVATIONS, ModelDims
from dexserve.engine.model_card import ModelCard, ModelLoadError
from dexserve.engine.request import (EngineFailure, FinishReason, Finished, GenerationRequest, InvalidRequest,
                                     StepResult, TokenEvent)
from dexserve.engine.stats import RunStats
from dexserve.engine.step import BufferSpec
from dexserve.engine.text import TextStream
from dexserve.engine.validation import Limits, validate_request

ExecutorKind = Literal["reference", "distributed"]


def parse_mode(mode: str, explorers: int) -> frozenset[int]:
    """`dex` spawns at every boundary, `ar` nowhere, `select:J` only at boundary J."""
    if mode == "dex":
        return frozenset(range(1, explorers))
    if mode == "ar":
        return frozenset()
    if mode.startswith("select:"):
        try:
            j = int(mode.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"mode {mode!r}: select:J needs an integer boundary J") from None
        if not 1 <= j < explorers:
            raise ValueError(f"mode {mode!r}: J must be a boundary in 1..{explorers - 1} for K={explorers}")
        return frozenset({j})
    raise ValueError(f"unknown mode {mode!r} (use dex, ar or select:J)")


@dataclass
class EngineConfig:
    explorers: int = 4
    width: int | tuple[int, ...] = 8      # rows per explorer per round (one value, or one per explorer)
    mode: str = "dex"
    decs: bool = True
    policy: Policy = "priority"
    max_context: int = 512
    max_batch: int = 4                    # requests in flight
    slots: int | None = None              # lattice slots; default K*W + max_batch
    prefill_chunk: int = 32
    max_new_tokens: int = 1024            # the largest max_new_tokens a request may ask for
    executor: ExecutorKind = "reference"
    transport: str = "auto"               # distributed: auto | shm (same-host CPU) | torch (gloo/NCCL)
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    cuda_graphs: bool = True

    def widths(self) -> tuple[int, ...]:
        """Rows per explorer step. Mode `ar` never spawns: each request has one
        node, so an explorer runs at most max_batch rows whatever W says (1 for
        a single stream); its steps are built that narrow."""
        w = (self.width,) * self.explorers if isinstance(self.width, int) else tuple(self.width)
        if len(w) != self.explorers:
            raise ValueError(f"width: give one value or {self.explorers} (one per explorer), got {len(w)}")
        if min(w) < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.mode == "ar":
            w = tuple(min(x, max(1, self.max_batch)) for x in w)
        return w


@dataclass
class _Active:
    req: GenerationRequest
    index: int
    prompt_len: int
    text: TextStream
    generated: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, card: ModelCard, config: EngineConfig, executor: Executor, tokenizer) -> None:
        self.card = card
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.limits = Limits(max_context=config.max_context, max_new_tokens=config.max_new_tokens)
        self._active: dict[str, _Active] = {}
        self._free_rows = list(range(config.max_batch - 1, -1, -1))
        self.reconfigure(config.mode, config.decs, config.policy)

    def reconfigure(self, mode: str, decs: bool, policy: Policy | None = None) -> None:
        """Switch mode/DECS/policy between requests: the executor and its
        weights stay, the lattice and the statistics start afresh."""
        if self._active:
            raise RuntimeError("reconfigure() needs an idle engine")
        spec = self.executor.spec
        self.config.mode, self.config.decs = mode, decs
        self.config.policy = policy or self.config.policy
        self.lattice = Lattice(LatticeConfig(
            explorers=spec.explorers, widths=spec.widths, slots=spec.buffers.lattice_slots,
            spawn_boundaries=parse_mode(mode, spec.explorers), decs=decs, policy=self.config.policy,
            max_context=self.config.max_context))
        self.stats = RunStats(spec.explorers)

    # ---- construction ----------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | None, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        card = ModelCard.load(model_dir)
        dims = ModelDims.from_config(card.config)
        if dims.act not in ACTIVATIONS:
            raise ModelLoadError(f"{card.path}: hidden_act {dims.act!r} is not supported")
        spec = cls.executor_spec(card, config)
        if config.executor == "reference":
            executor: Executor = ReferenceExecutor(card, spec)
        elif config.executor == "distributed":
            from dexserve.engine.distributed import DistributedExecutor

            executor = DistributedExecutor(card, spec, transport=config.transport)
        else:
            raise ValueError(f"unknown executor {config.executor!r} (reference or distributed)")
        return cls(card, config, executor, card.tokenizer())

    @staticmethod
    def executor_spec(card: ModelCard, config: EngineConfig) -> ExecutorSpec:
        K = config.explorers
        if not 1 <= K <= card.num_layers:
            raise ValueError(f"explorers: K={K} must be in 1..{card.num_layers} (the model's layer count)")
        if config.max_context > card.max_position_embeddings:
            raise ValueError(f"max_context {config.max_context} exceeds the model's "
                             f"max_position_embeddings {card.max_position_embeddings}")
        if config.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        widths = config.widths()
        parse_mode(config.mode, K)
        slots = config.slots or (sum(widths) + config.max_batch)
        if slots < config.max_batch:
            raise ValueError(f"slots ({slots}) must be at least max_batch ({config.max_batch})")
        buffers = BufferSpec(max_batch=config.max_batch, max_context=config.max_context, lattice_slots=slots,
                             prefill_rows=config.prefill_chunk, ancestors=K)
        return ExecutorSpec(boundaries=even_boundaries(card.num_layers, K), buffers=buffers, widths=widths,
                            candidates=max(1, K - 1), device=config.device, dtype=getattr(torch, config.dtype),
                            compile=config.compile, cuda_graphs=config.cuda_graphs)

    # ---- requests --------------------------------------------------------
    def encode(self, req: GenerationRequest) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        return self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]

    def validate(self, req: GenerationRequest) -> list[int]:
        validate_request(req, self.limits, None)
        ids = self.encode(req)
        validate_request(req, self.limits, len(ids))
        bad = [t for t in ids if not 0 <= t < self.card.vocab_size]
        if bad:
            raise InvalidRequest("prompt_ids", f"token id {bad[0]} outside the vocabulary (0..{self.card.vocab_size - 1})")
        return ids

    def has_capacity(self) -> bool:
        return bool(self._free_rows)

    @property
    def active(self) -> int:
        return len(self._active)

    def add(self, req: GenerationRequest) -> None:
        if req.request_id in self._active:
            raise InvalidRequest("request_id", f"{req.request_id!r} is already running")
        ids = self.validate(req)
        if not self._free_rows:
            raise RuntimeError("engine is full: check has_capacity() before add()")
        index = self._free_rows.pop()
        try:
            self.executor.set_sampling(index, req.sampling)
            if len(ids) > 1:
                self.executor.prefill(index, ids[:-1])
        except ExecutorFailure as exc:
            self._free_rows.append(index)
            raise self._recover(exc, [req.request_id]) from exc
        self.lattice.add_request(req.request_id, index, ids[-1], len(ids) - 1)
        self._active[req.request_id] = _Active(req, index, len(ids), TextStream(self.tokenizer, req.stop))

    def cancel(self, request_id: str) -> Finished | None:
        act = self._active.get(request_id)
        if act is None:
            return None
        return self._finish(act, FinishReason.CANCELLED)

    # ---- rounds ----------------------------------------------------------
    def step(self) -> StepResult:
        if not self._active:
            return StepResult(None)
        t0 = time.perf_counter()
        plan = self.lattice.plan()
        t1 = time.perf_counter()
        try:
            readout = self.executor.run(plan)
        except ExecutorFailure as exc:
            raise self._recover(exc, []) from exc
        t2 = time.perf_counter()
        record = self.lattice.advance(readout)
        record = dataclasses.replace(record, seconds=t2 - t1, lattice_seconds=(t1 - t0) + (time.perf_counter() - t2))
        self.stats.observe(record)
        result = StepResult(record)
        for c in record.commits:
            act = self._active[c.request_id]
            act.generated.append(c.token)
            eos = c.token in self.card.eos_token_ids and not act.req.ignore_eos
            delta, stopped = act.text.push(c.token, final=eos)
            result.tokens.append(TokenEvent(c.request_id, len(act.generated) - 1, c.token, delta))
            reason = None
            if stopped:
                reason = FinishReason.STOP
            elif eos:
                reason = FinishReason.EOS
            elif len(act.generated) >= act.req.max_new_tokens:
                reason = FinishReason.LENGTH
            elif act.prompt_len + len(act.generated) >= self.config.max_context:
                reason = FinishReason.CONTEXT
            if reason is not None:
                result.finished.append(self._finish(act, reason))
        return result

    def _recover(self, exc: ExecutorFailure, extra: list[str]) -> EngineFailure:
        """Drop every request in flight, restart the executor, start a fresh lattice."""
        lost = list(self._active) + extra
        self._active.clear()
        self._free_rows = list(range(self.config.max_batch - 1, -1, -1))
        self.executor.restart()
        stats = self.stats
        self.reconfigure(self.config.mode, self.config.decs)
        self.stats = stats
        return EngineFailure(f"decoding failed and was restarted: {exc}", lost)

    def _finish(self, act: _Active, reason: FinishReason) -> Finished:
        self.lattice.remove_request(act.req.request_id)
        del self._active[act.req.request_id]
        self._free_rows.append(act.index)
        tail = act.text.flush() if reason is not FinishReason.STOP else ""
        return Finished(act.req.request_id, reason, act.prompt_len, len(act.generated), tail)

    # ---- convenience -----------------------------------------------------
    def generate(self, req: GenerationRequest) -> Iterator[TokenEvent | Finished]:
        """Run one request to the end on an idle engine, yielding its tokens as
        they commit. (Serving loops use add/step: they own the other requests.)"""
        if self._active:
            raise RuntimeError("generate() needs an idle engine; drive concurrent requests with add() and step()")
        self.add(req)
        while True:
            res = self.step()
            for ev in res.tokens:
                if ev.request_id == req.request_id:
                    yield ev
            for fin in res.finished:
                if fin.request_id == req.request_id:
                    yield fin
                    return

    def close(self) -> None:
        self.executor.close()
