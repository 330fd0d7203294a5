"""The per-explorer lattice step: one segment of layers over W rows, plus the
readout at the segment's boundary.

It is a pure tensor function of static-shaped buffers. Inputs are small index
tensors (token, position, slot, KV row, visible range, ancestor rows); the KV
buffers of the explorer's layers and the hidden-state buffer are mutated in
place; the output is the ranked candidates at the boundary. No shape depends
on the data, nothing is allocated outside the graph, nothing is read back to
the host: on CUDA it is captured once as a graph and replayed; on CPU it
compiles with `torch.compile(fullgraph=True)`.

Buffer layout (the answer to "where does a node's KV live"):
  KV rows  [0, R*C)          committed context, request r at rows r*C .. r*C+C-1
           [R*C, R*C+N)      lattice slots: a speculative node's KV, all layers
           R*C+N             scratch row for padding rows
  hidden   [0, N)            a lattice node's latest hidden state
           [N, N+G*P)        prefill rows: G chunks of P (G > 1 lets the explorers of
                             one prompt work on different chunks at once)
           N+G*P             scratch
A node keeps its KV in its lattice slot while speculative and while it is the
anchor; when it finishes the last segment (its successor is committed) the
executor copies its rows to the committed context and frees the slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dexserve.contract.limits import DEFAULT_LIMITS
from dexserve.engine.model import Weights, layer_forward, linear, rms_norm, row_dots
from dexserve.engine.sampling import selection_scores


@dataclass(frozen=True)
class BufferSpec:
    """Static sizes fixed at start-up (DEX.md "Bounded")."""

    max_batch: int      # R: requests in flight
    max_context: int    # C: positions per request
    lattice_slots: int  # N
    prefill_rows: int   # P
    ancestors: int      # A: ancestor rows per node (incl. itself) = K
    prefill_chunks: int = 1  # G: prompt chunks in flight at once (their hidden rows)

    @property
    def kv_rows(self) -> int:
        return self.max_batch * self.max_context + self.lattice_slots + 1

    @property
    def kv_scratch(self) -> int:
        return self.kv_rows - 1

    def lattice_kv_row(self, slot: int) -> int:
        return self.max_batch * self.max_context + slot

    @property
    def hidden_rows(self) -> int:
        return self.lattice_slots + self.prefill_chunks * self.prefill_rows + 1

    @property
    def hidden_scratch(self) -> int:
        return self.hidden_rows - 1


MAX_LOGPROBS = DEFAULT_LIMITS.max_logprobs  # alternatives the final readout reports
LOGPROB_SCALE = 1e9       # log-probabilities travel as int64 fixed point with the candidates
LOGPROB_FLOOR = -9999.0   # -inf is reported as OpenAI reports it
_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}   # bitwise row copies


def logprob_top(vocab: int) -> int:
    """How many alternatives the final readout reports for a vocabulary."""
    return min(MAX_LOGPROBS, vocab)


def logprob_width(candidates: int, vocab: int) -> int:
    """Columns of a final readout with log-probabilities: candidates, the chosen
    token's log-probability, the top ids, their log-probabilities."""
    return candidates + 1 + 2 * logprob_top(vocab)


def logprob_columns(raw: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """The readout's natural-log probabilities (of the model's own distribution,
    before temperature and filtering) as int64 columns: the chosen token's, then
    the `top` most likely token ids, then their log-probabilities (fixed point,
    LOGPROB_SCALE; `decode_logprobs` reads them back)."""
    lp = torch.log_softmax(raw.float(), dim=-1)
    best = torch.topk(lp, top, dim=-1)

    def fixed(v: torch.Tensor) -> torch.Tensor:
        return torch.round(v.clamp(min=LOGPROB_FLOOR).double() * LOGPROB_SCALE).long()
    return fixed(lp.gather(-1, chosen)), best.indices, fixed(best.values)


def decode_logprobs(row, n: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """One row of `logprob_columns` (host ints) -> (chosen logprob, the n best (id, logprob))."""
    top = (len(row) - 1) // 2
    ids, vals = row[1:1 + top], row[1 + top:]
    return row[0] / LOGPROB_SCALE, tuple((int(ids[i]), vals[i] / LOGPROB_SCALE) for i in range(min(n, top)))


def span_buckets(limit: int, smallest: int = 32) -> tuple[int, ...]:
    """Attention spans a step is built for: powers of two from `smallest`, capped
    by `limit` (the most committed rows a row can see: max context or sliding
    window). Few enough to capture each as its own CUDA graph."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return (*out, limit)


def span_for(need: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `need` committed rows."""
    for b in buckets:
        if b >= need:
            return b
    raise ValueError(f"a row sees {need} committed rows, more than the largest span {buckets[-1]}")


@dataclass
class StepInputs:
    """Per-row inputs of one explorer step; every tensor has W rows."""

    token: torch.Tensor     # long [W]: token id (first explorer embeds it)
    position: torch.Tensor  # long [W]
    slot: torch.Tensor      # long [W]: hidden-state row
    kv_row: torch.Tensor    # long [W]: where this row's K/V go
    request: torch.Tensor   # long [W]: request index (sampling table row)
    lo: torch.Tensor        # long [W]: visible committed rows [lo, hi)
    hi: torch.Tensor        # long [W]
    anc: torch.Tensor       # long [W, A]: visible lattice rows (ancestors and itself)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.token, self.position, self.slot, self.kv_row, self.request, self.lo, self.hi, self.anc)


class ExplorerStep(nn.Module):
    """Explorer k: layers [first_layer, last_layer), readout at depth last_layer."""

    def __init__(self, weights: Weights, layers: range, spec: BufferSpec, cos: torch.Tensor, sin: torch.Tensor,
                 candidates: int, first: bool, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, hidden: torch.Tensor | None = None) -> None:
        super().__init__()
        d = weights.dims
        self.dims = d
        self.layers = [weights.layers[i] for i in layers]
        self.depth = layers.stop
        self.first = first
        self.candidates = candidates
        self.embed = weights.embed if first else None
        self.final_norm = weights.final_norm
        self.lm_head = weights.lm_head
        adapter = weights.adapters.get(layers.stop)  # (A, None, b): r + A r + b; (U, V, b): r + U (V r) + b
        self.adapter_w, self.adapter_v, self.adapter_b = adapter if adapter else (None, None, None)
        self.cos, self.sin = cos, sin
        self.spec = spec
        self.logprobs_top = logprob_top(d.vocab)
        # all of this explorer's K and V in one tensor: layer i's K buffer is rows
        # [i*R, (i+1)*R) and its V buffer rows [(n+i)*R, (n+i+1)*R) (R = kv_rows, n layers).
        # Retiring a node moves its rows for every layer in one gather and one scatter
        n = len(layers)
        self.kv = torch.zeros(2 * n * spec.kv_rows, d.kv_heads, d.head_dim, device=device, dtype=dtype)
        self.kv_bases = [(i * spec.kv_rows, (n + i) * spec.kv_rows) for i in range(n)]
        self.buffer_offsets = torch.arange(2 * n, device=device)[:, None] * spec.kv_rows
        # on the host a retire is one numpy gather and scatter over the same memory, rows copied
        # bit for bit whatever the dtype (torch's eager index ops pay dispatch per op, several times the copy)
        self.host_kv = self.kv.view(_SAME_SIZE_INT[self.kv.element_size()]).numpy() \
            if self.kv.device.type == "cpu" else None
        self.host_offsets = self.buffer_offsets.numpy() if self.host_kv is not None else None
        # explorer k reads the hidden states explorer k-1 left here; in one
        # process all explorers share one buffer, across processes each has its own
        self.hidden = hidden if hidden is not None else torch.zeros(spec.hidden_rows, d.hidden, device=device, dtype=dtype)
        self.key_index = torch.arange(spec.kv_rows, device=device)
        # per-request sampling table, written at admission
        self.temperature = torch.zeros(spec.max_batch, device=device)
        self.top_k = torch.zeros(spec.max_batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(spec.max_batch, device=device)
        self.seed = torch.zeros(spec.max_batch, dtype=torch.long, device=device)

    def forward(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, kv_row: torch.Tensor,
                request: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, anc: torch.Tensor,
                sampled: bool = True, span: int | None = None, logprobs: bool = False,
                prefill: bool = False, dots: bool = False) -> torch.Tensor:
        """Host-side choices pick the variant, each its own static graph:
        `sampled=False` is the greedy variant (no filtering, no noise), and
        `span` (a bucket from `span_buckets`, at least every row's hi - lo) is
        how many committed rows from `lo` each row gathers for attention, so a
        short context reads a short slice of the KV buffers, not all of it.
        `logprobs` (the final depth, when a request asks): the candidates are
        followed by the log-probabilities of the readout (see `logprob_columns`).
        `prefill`: the rows are a prompt chunk, one request's consecutive
        positions, attending over one shared slice (`prefill_keys`).
        `dots`: the weight projections are `model.row_dots` (compiled one-row CPU
        steps), else `F.linear`."""
        lin = row_dots if dots else linear
        if self.first:
            x = self.embed[token]
        else:
            x = self.hidden.index_select(0, slot)
        if prefill:
            keys, mask = self.prefill_keys(lo, hi, kv_row, span or self.spec.max_context)
        else:
            keys, mask = self.visible_keys(lo, hi, anc, span or self.spec.max_context)
        cos = self.cos[position]
        sin = self.sin[position]
        for lw, (k_base, v_base) in zip(self.layers, self.kv_bases):
            x = layer_forward(x, lw, self.dims, cos, sin, self.kv, k_base, v_base, kv_row, keys, mask, lin)
        self.hidden.index_copy_(0, slot, x)
        r = x
        if self.adapter_w is not None:
            a = r if self.adapter_v is None else lin(r, self.adapter_v, None)
            r = r + lin(a, self.adapter_w, self.adapter_b)
        raw = lin(rms_norm(r, self.final_norm, self.dims.eps), self.lm_head, None)
        logits = raw
        # the readout at this depth proposes the token for position + 1
        if sampled:
            logits = selection_scores(logits, self.temperature[request], self.top_k[request], self.top_p[request],
                                      self.seed[request], position + 1)
        if self.candidates == 1:  # one candidate: a fused reduction, not a top-k call
            cand = logits.argmax(dim=-1, keepdim=True)
        else:
            cand = torch.topk(logits, self.candidates, dim=-1).indices
        if not logprobs:
            return cand
        return torch.cat([cand, *logprob_columns(raw, cand[:, :1], self.logprobs_top)], dim=1)

    def visible_keys(self, lo: torch.Tensor, hi: torch.Tensor, anc: torch.Tensor,
                     span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV rows [W, span + A] each row attends to and which of them it sees:
        committed rows lo .. hi-1 (the rest of the span is masked), then its
        uncommitted ancestors and itself. `anc` is padded by repeating a row;
        a repeat is masked so no key counts twice."""
        ctx = lo[:, None] + self.key_index[None, :span]
        ctx_mask = ctx < hi[:, None]
        ctx = ctx.clamp(max=self.spec.kv_scratch)
        A = anc.shape[1]
        earlier = torch.ones(A, A, dtype=torch.bool, device=anc.device).tril(-1)
        repeat = ((anc[:, :, None] == anc[:, None, :]) & earlier).any(-1)
        return torch.cat([ctx, anc], dim=1), torch.cat([ctx_mask, ~repeat], dim=1)

    def prefill_keys(self, lo: torch.Tensor, hi: torch.Tensor, kv_row: torch.Tensor,
                     span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt chunk's keys: one slice [span] of its request's rows from the
        first row's `lo`, and which of them each row sees: [lo, hi] (its committed
        rows and itself, written at hi). A padding row sees the slice's first key
        (finite: a committed row or one written this step), never nothing."""
        ctx = lo[:1] + self.key_index[:span]
        real = kv_row != self.spec.kv_scratch
        mask = torch.where(real[:, None], (ctx[None, :] >= lo[:, None]) & (ctx[None, :] <= hi[:, None]),
                           self.key_index[None, :span] == 0)
        return ctx.clamp(max=self.spec.kv_scratch), mask

    def retire(self, src_rows, dst_rows) -> None:
        """Move finished nodes' K/V from lattice rows to committed rows. On the host
        the rows may come as numpy arrays (the payload's own memory)."""
        if not self.layers:
            return
        if self.host_kv is not None:
            kv, off = self.host_kv, self.host_offsets
            if isinstance(src_rows, torch.Tensor):
                src_rows, dst_rows = src_rows.numpy(), dst_rows.numpy()
            kv[(off + dst_rows).ravel()] = kv[(off + src_rows).ravel()]
            return
        off = self.buffer_offsets
        self.kv.index_copy_(0, (off + dst_rows[None, :]).reshape(-1),
                            self.kv.index_select(0, (off + src_rows[None, :]).reshape(-1)))

    @property
    def k_bufs(self) -> list[torch.Tensor]:
        """Per-layer K buffers [rows, kv_heads, head_dim] (views of `kv`)."""
        R = self.spec.kv_rows
        return [self.kv[k:k + R] for k, _ in self.kv_bases]

    @property
    def v_bufs(self) -> list[torch.Tensor]:
        R = self.spec.kv_rows
        return [self.kv[v:v + R] for _, v in self.kv_bases]

    def set_sampling(self, index: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        self.temperature[index] = temperature
        self.top_k[index] = top_k
        self.top_p[index] = top_p
        self.seed[index] = seed
