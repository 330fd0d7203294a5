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
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from dexserve.engine.adapters import AdapterInfo, resolve_adapters
from dexserve.engine.distributed import DistributedExecutor
from dexserve.engine.executor import Executor, ExecutorFailure, ExecutorSpec, ReferenceExecutor, even_boundaries
from dexserve.engine.config import AUTO_WIDTH, EngineConfig, parse_mode
from dexserve.engine.memory import host_cores, kv_budget, parallel_devices, weight_bytes
from dexserve.engine.lattice import Lattice, LatticeConfig, Policy
from dexserve.engine.model import ACTIVATIONS, ModelDims
from dexserve.contract.engine import EngineInfo
from dexserve.contract.model_card import ModelCard, ModelLoadError
from dexserve.contract.request import (EngineFailure, FinishReason, Finished, GenerationRequest, InvalidRequest,
                                     StepResult, TokenEvent, finish_reason)
from dexserve.engine.sampling import fold_seed
from dexserve.engine.stats import RunStats
from dexserve.engine.step import BufferSpec, decode_logprobs
from dexserve.engine.tokenizer import load_tokenizer, text_decoder
from dexserve.contract.text import TextStream
from dexserve.contract.validation import validate_request

log = logging.getLogger(__name__)

PIPELINED_CHUNKS = 64   # prefill chunks one command carries through the explorer processes


@dataclass
class _Active:
    req: GenerationRequest
    index: int
    prompt_len: int
    text: TextStream
    generated: list[int] = field(default_factory=list)


@dataclass
class _Prefill:
    """A request whose prompt is still being written to its KV rows, a chunk at a time."""
    act: _Active
    ids: list[int]      # the prompt; positions 0..len-2 are prefilled, the last token seeds the lattice
    done: int = 0       # positions prefilled so far (a multiple of the chunk, or all of them)
    part: int = 0       # the next part of chunk `done` (executor.prefill_parts: its explorers)
    chunk_seconds: float = 0.0   # what its last prefill call took (the next, further in, costs at least that)


class DexEngine:
    def __init__(self, card: ModelCard, config: EngineConfig, executor: Executor, tokenizer) -> None:
        self.card = card
        # an auto batch is what the executor was built for
        self.config = config if config.max_batch else dataclasses.replace(
            config, max_batch=executor.spec.buffers.max_batch)
        config = self.config
        self.executor = executor
        self.tokenizer = tokenizer
        self.decoder = text_decoder(tokenizer)   # detokenizes committed tokens
        self.limits = config.limits
        self._active: dict[str, _Active] = {}
        self._prefilling: dict[str, _Prefill] = {}   # admitted, prompt not yet fully prefilled (FIFO)
        self._round_seconds = 0.0                    # recent round time (EMA): sizes the prefill share
        self._prefill_credit = 0.0                   # prefill time the running streams have granted, not yet spent
        self._clock = time.perf_counter              # (tests drive a scripted clock)
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

    @property
    def adapters(self) -> AdapterInfo | None:
        """The boundary adapters this engine reads out through (None: the shared head alone)."""
        return self.executor.spec.adapters

    # ---- construction ----------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | None, config: EngineConfig | None = None) -> "DexEngine":
        card = ModelCard.load(model_dir)
        config = cls.laid_out(card, config or EngineConfig())
        # This process's intra-op threads; the explorer processes get the same. On the distributed executor
        # each explorer process defaults to its share of the cores (one thread each where there are K).
        # Set before anything compiles: compiled kernels keep the thread count they were built with.
        threads = config.threads or (max(1, host_cores() // config.explorers)
                                     if config.executor == "distributed" else torch.get_num_threads())
        torch.set_num_threads(threads)
        config = dataclasses.replace(config, threads=threads)
        dims = ModelDims.from_config(card.config)
        if dims.act not in ACTIVATIONS:
            raise ModelLoadError(f"{card.path}: hidden_act {dims.act!r} is not supported")
        spec = cls.executor_spec(card, config)   # sizes an auto batch; the engine takes it from the spec
        # (laid_out settled the executor: reference or distributed)
        executor: Executor = DistributedExecutor(card, spec, threads=threads, transport=config.transport) \
            if config.executor == "distributed" else ReferenceExecutor(card, spec)
        return cls(card, config, executor, load_tokenizer(card))

    @staticmethod
    def laid_out(card: ModelCard, config: EngineConfig) -> EngineConfig:
        """`config` with auto explorers and executor settled for this model and the devices here
        (`EngineConfig.laid_out`)."""
        return config.laid_out(parallel_devices(config.device), card.num_layers)

    @staticmethod
    def sized(card: ModelCard, config: EngineConfig) -> EngineConfig:
        """`config` with an auto batch (max_batch 0) sized by the KV budget (`engine.memory`)."""
        if config.max_batch:
            return config
        dtype = getattr(torch, config.resolved_dtype(card.dtype))
        widest = max(config.width) if isinstance(config.width, tuple) else (config.width or AUTO_WIDTH)
        budget = kv_budget(ModelDims.from_config(card.config), dtype, config.device, config.max_context,
                           weight_bytes(card.path, card.dtype, dtype), config.kv_memory_gib,
                           slots=config.slots or config.explorers * widest)   # the lattice's own KV rows
        if budget.max_batch < 1:
            raise ValueError(f"the KV budget does not hold one {config.max_context}-position request: "
                             f"{budget.describe()}; lower --max-context or raise --kv-memory")
        log.info("max_batch auto: %d (%s)", budget.batch, budget.describe())
        return dataclasses.replace(config, max_batch=budget.batch)

    @staticmethod
    def executor_spec(card: ModelCard, config: EngineConfig) -> ExecutorSpec:
        config = DexEngine.sized(card, DexEngine.laid_out(card, config))
        K = config.explorers
        if not 1 <= K <= card.num_layers:
            raise ValueError(f"explorers: K={K} must be in 1..{card.num_layers} (the model's layer count)")
        if config.max_context > card.max_position_embeddings:
            raise ValueError(f"max_context {config.max_context} exceeds the model's "
                             f"max_position_embeddings {card.max_position_embeddings}")
        if config.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if config.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {config.prefill_chunk}")
        if not 0 <= config.prefill_share < float("inf"):
            raise ValueError(f"prefill_share must be a finite number >= 0, got {config.prefill_share}")
        widths = config.widths()
        parse_mode(config.mode, K)
        slots = config.slots or (sum(widths) + config.max_batch)
        if slots < config.max_batch:
            raise ValueError(f"slots ({slots}) must be at least max_batch ({config.max_batch})")
        # explorers in their own processes pipeline a prompt's chunks (explorer k on chunk c
        # while k+1 is on c-1): each chunk in flight gets its own hidden rows (a whole prompt's
        # worth, up to PIPELINED_CHUNKS; a longer prompt takes several prefill commands)
        chunks = min(PIPELINED_CHUNKS, -(-config.max_context // config.prefill_chunk)) \
            if config.executor == "distributed" else 1
        buffers = BufferSpec(max_batch=config.max_batch, max_context=config.max_context, lattice_slots=slots,
                             prefill_rows=config.prefill_chunk, ancestors=K, prefill_chunks=chunks)
        boundaries = even_boundaries(card.num_layers, K)
        return ExecutorSpec(boundaries=boundaries, buffers=buffers, widths=widths,
                            candidates=max(1, K - 1), device=config.device,
                            dtype=getattr(torch, config.resolved_dtype(card.dtype)),
                            compile=config.compile, cuda_graphs=config.cuda_graphs, vocab=card.vocab_size,
                            adapters=resolve_adapters(card, config.adapters, boundaries[1:-1]))

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
        """Admit a request: it takes a batch row now; its prompt is prefilled by
        the following `step` calls, in chunks between the running requests'
        rounds (`EngineConfig.prefill_share`), and it joins the lattice when
        its prompt is in."""
        if req.request_id in self._active:
            raise InvalidRequest("request_id", f"{req.request_id!r} is already running")
        ids = self.validate(req)
        if not self._free_rows:
            raise RuntimeError("engine is full: check has_capacity() before add()")
        index = self._free_rows.pop()
        try:
            self.executor.set_sampling(index, dataclasses.replace(req.sampling, seed=fold_seed(req.sampling.seed)))
        except ExecutorFailure as exc:
            self._free_rows.append(index)
            raise self._recover(exc, [req.request_id]) from exc
        except BaseException:
            # a refused request gives back its batch row, so it never shrinks the engine
            self._free_rows.append(index)
            raise
        act = _Active(req, index, len(ids), TextStream(self.decoder, req.stop))
        self._active[req.request_id] = act
        self._prefilling[req.request_id] = _Prefill(act, ids)

    @property
    def prefilling(self) -> int:
        """Admitted requests whose prompts are not yet fully prefilled."""
        return len(self._prefilling)

    def _prefill(self) -> None:
        """Prefill admitted prompts, oldest first. With nothing decoding, the
        oldest goes in whole (nobody waits on it) and starts decoding. While
        requests decode, prefill runs on credit, a part of a chunk at a time:
        a chunk goes down the explorers as a token does, explorer k's layers in
        part k (`executor.prefill_parts`; 1 where the executor runs a chunk
        whole). Each step grants `prefill_share` x a recent round's time, and a
        part runs once the credit covers what the prompt's last part took (the
        first runs at once). A part dearer than a round therefore waits a few
        rounds and lands in one of them: a running stream's gap grows by at
        most one part (1/K of a chunk), and on average prefill takes
        `prefill_share` x the rounds' time. `prefill_share` 0 prefills every
        pending prompt whole (the running streams wait). Chunks always start at
        multiples of `prefill_chunk` and run their parts in order, nothing in
        between touching their rows: how prompts interleave with rounds never
        changes what is computed."""
        share, chunk = self.config.prefill_share, self.config.prefill_chunk
        parts = self.executor.prefill_parts
        if share > 0 and len(self._active) > len(self._prefilling):
            grant = share * self._round_seconds
            pending = next(iter(self._prefilling.values())).chunk_seconds
            self._prefill_credit = min(self._prefill_credit + grant, max(grant, pending))
        for rid in list(self._prefilling):
            p = self._prefilling[rid]
            todo = len(p.ids) - 1
            while p.done < todo:
                interleave = share > 0 and len(self._active) > len(self._prefilling)
                if interleave and self._prefill_credit < p.chunk_seconds:
                    return
                # in parts while interleaving, and to finish a chunk begun in parts
                split = parts > 1 and (interleave or p.part > 0)
                end = min(todo, p.done + chunk) if interleave or split else todo
                t0 = self._clock()
                try:
                    if split:
                        self.executor.prefill(p.act.index, p.ids[p.done:end], p.done, part=p.part)
                    else:
                        self.executor.prefill(p.act.index, p.ids[p.done:end], p.done)
                except ExecutorFailure as exc:
                    raise self._recover(exc, []) from exc
                except BaseException:
                    self._release(p.act)   # this request gives back its row; the others go on
                    raise
                p.chunk_seconds = self._clock() - t0
                p.part = (p.part + 1) % parts if split else 0
                if p.part == 0:
                    p.done = end
                self.stats.prefill_seconds += p.chunk_seconds
                if interleave:   # (a prompt's first part runs on no credit: it measures the cost)
                    self._prefill_credit = max(0.0, self._prefill_credit - p.chunk_seconds)
            if not self.lattice.can_add():
                return   # its prompt is in; it joins once a commit frees a slot (spawns leave one)
            del self._prefilling[rid]
            self.lattice.add_request(rid, p.act.index, p.ids[-1], todo)

    def cancel(self, request_id: str) -> Finished | None:
        act = self._active.get(request_id)
        if act is None:
            return None
        return self._finish(act, FinishReason.CANCELLED)

    # ---- rounds ----------------------------------------------------------
    def step(self) -> StepResult:
        if self._prefilling:
            self._prefill()
        # spawning leaves a lattice slot free for each request about to join
        self.lattice.reserved = len(self._prefilling)
        if len(self._active) == len(self._prefilling):   # nothing decoding (yet)
            return StepResult(None)
        t0 = self._clock()
        plan = self.lattice.plan()
        t1 = self._clock()
        logprobs = any(act.req.logprobs is not None for act in self._active.values())
        try:
            # (an executor is asked for log-probabilities only when a request wants them)
            readout = self.executor.run(plan, True) if logprobs else self.executor.run(plan)
        except ExecutorFailure as exc:
            raise self._recover(exc, []) from exc
        t2 = self._clock()
        record = self.lattice.absorb(readout)
        record = dataclasses.replace(record, seconds=t2 - t1, lattice_seconds=(t1 - t0) + (self._clock() - t2))
        self.stats.observe(record)
        self._round_seconds = record.seconds if not self._round_seconds else \
            0.8 * self._round_seconds + 0.2 * record.seconds
        result = StepResult(record)
        final = self._final_logprobs(plan) if logprobs else {}
        for c in record.commits:
            act = self._active[c.request_id]
            act.generated.append(c.token)
            eos = c.token in self.card.eos_token_ids and not act.req.ignore_eos
            delta, stopped = act.text.push(c.token, final=eos)
            lp, top = (None, ())
            if act.req.logprobs is not None:
                lp, top = decode_logprobs(final[c.request_id], act.req.logprobs)
            result.tokens.append(TokenEvent(c.request_id, len(act.generated) - 1, c.token, delta, lp, top))
            reason = finish_reason(stopped=stopped, eos=eos, generated=len(act.generated),
                                   max_new_tokens=act.req.max_new_tokens, prompt_tokens=act.prompt_len,
                                   max_context=self.config.max_context)
            if reason is not None:
                result.finished.append(self._finish(act, reason))
        return result

    def _final_logprobs(self, plan) -> dict[str, list[int]]:
        """Request id -> the log-probability columns of its final-depth row this round.
        Only an anchor runs the last segment, so a request has at most one such row."""
        cols = self.executor.final_logprobs()
        return {} if cols is None else {row.request_id: c for row, c in zip(plan.rows[-1], cols)}

    def _recover(self, exc: ExecutorFailure, extra: list[str]) -> EngineFailure:
        """Drop every request in flight, restart the executor, start a fresh lattice."""
        lost = list(self._active) + extra
        self._active.clear()
        self._prefilling.clear()
        self._free_rows = list(range(self.config.max_batch - 1, -1, -1))
        self.executor.restart()
        stats = self.stats
        self.reconfigure(self.config.mode, self.config.decs)
        self.stats = stats
        return EngineFailure(f"decoding failed and was restarted: {exc}", lost)

    def _release(self, act: _Active) -> None:
        """Give back everything a request holds: its lattice nodes, its batch row."""
        rid = act.req.request_id
        if self._prefilling.pop(rid, None) is None:
            self.lattice.remove_request(rid)
        del self._active[rid]
        self._free_rows.append(act.index)

    def _finish(self, act: _Active, reason: FinishReason) -> Finished:
        self._release(act)
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

    @property
    def info(self) -> EngineInfo:
        spec = self.executor.spec
        return EngineInfo(model=self.card.name, engine="dex", explorers=spec.explorers,
                          executor=self.config.executor, mode=self.config.mode,
                          lattice_slots=spec.buffers.lattice_slots, logprobs=not spec.null_step,
                          max_batch=spec.buffers.max_batch, width=max(spec.widths))

    def close(self) -> None:
        self.executor.close()
