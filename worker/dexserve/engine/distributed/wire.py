"""The wire format between the coordinator and its explorers: command codes,
the layout of the one static int64 payload every command travels in, and the
settings rank 0 hands to every explorer at start-up.

Payload layout (int64, `PlanCodec.size` values, allocated once):
  [0]                       command (CMD_*)
  round:
    [1 .. K]                rows planned per explorer
    [K+1]                   retire count
    [K+2]                   sampled flag (any row of the round samples)
    [K+3 .. 2K+2]           attention span per explorer
    [2K+3]                  log-probabilities flag (the final explorer reports them)
    header + off_k          explorer k's rows: [W_k, 7 + A] (token, position, slot,
                            kv_row, request, lo, hi, A ancestor KV rows)
    retire_off              [2, retire_max]: lattice KV rows -> context KV rows
  prefill: [1] chunks n, [2] part + 1 (0: the chunks whole, pipelined; k + 1: explorer k's
                            layers of chunk 0 alone), rows [G, P, 7 + A] at `prefill_off` (after the
                            round's regions): chunk c of n fills region c, its hidden rows are chunk c's
  sampling: [1 .. 5] index, temperature (float64 bits), top_k, top_p (bits), seed

Every region sits at a fixed offset, so each side builds its numpy and torch
views of the payload once (`PlanCodec.views`) and a round only writes numbers.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import numpy as np
import torch

from dexserve.engine.executor import ExecutorSpec
from dexserve.engine.step import StepInputs, logprob_width

CMD_ROUND, CMD_PREFILL, CMD_SAMPLING, CMD_STOP = 1, 2, 3, 4
FIELDS = 7  # token, position, slot, kv_row, request, lo, hi (+ A ancestor rows)


def f2i(x: float) -> int:
    """A float64's bits as an int64 (floats travel in the int64 payload)."""
    return int(np.array([x], dtype=np.float64).view(np.int64)[0])


def i2f(x: int) -> float:
    return float(np.array([x], dtype=np.int64).view(np.float64)[0])


@dataclasses.dataclass(frozen=True)
class ExplorerSettings:
    """Everything an explorer process needs to build its part of the executor,
    decided once by rank 0: spawned explorers get it as an argument, torchrun
    ranks over the start-up handshake (`torchrun.exchange_settings`), so both
    run with rank 0's compile / CUDA-graph / thread / null-step settings."""

    model_path: str
    spec: ExecutorSpec
    threads: int
    timeout: timedelta

    def apply(self) -> None:
        """Process-wide settings, before anything is built."""
        torch.set_num_threads(self.threads)


@dataclasses.dataclass
class PayloadViews:
    """Views of one payload array (no copies): what the packer writes and the
    steps read."""

    array: np.ndarray                 # the whole payload
    header: np.ndarray
    rows: list[np.ndarray]            # per explorer [W_k, 7 + A]
    inputs: list[StepInputs]          # the same memory as step inputs
    retire: np.ndarray                # [2, retire_max]
    retire_t: torch.Tensor
    prefill_rows: np.ndarray          # [G, P, 7 + A]: one region per prompt chunk


class PlanCodec:
    """The static payload layout for an executor spec."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        K = spec.explorers
        self.K = K
        self.header = max(8, 2 * K + 4)
        A = spec.buffers.ancestors
        self.row = FIELDS + A
        self.sizes = [w * self.row for w in spec.widths]
        self.offsets = [self.header + sum(self.sizes[:k]) for k in range(K)]
        self.retire_off = self.header + sum(self.sizes)
        self.retire_max = spec.buffers.max_batch
        self.prefill_size = spec.buffers.prefill_chunks * spec.buffers.prefill_rows * self.row
        self.round_size = self.retire_off + 2 * self.retire_max
        self.prefill_off = self.round_size  # its own region: a prefill leaves the round rows as they were
        self.size = self.prefill_off + self.prefill_size
        # header indices of a round
        self.COUNTS = 1
        self.RETIRE = 1 + K
        self.SAMPLED = 2 + K
        self.SPANS = 3 + K
        self.LOGPROBS = 3 + 2 * K
        # candidates per row in the answer: the final explorer may add its log-probabilities
        self.cand_width = logprob_width(spec.candidates, spec.vocab) if spec.vocab else spec.candidates

    @staticmethod
    def step_inputs(t: torch.Tensor) -> StepInputs:
        return StepInputs(*(t[:, i] for i in range(FIELDS)), anc=t[:, FIELDS:])

    def views(self, payload: torch.Tensor) -> PayloadViews:
        """`payload`: a CPU int64 tensor of `size` values (shared or local)."""
        arr = payload.numpy()
        rows, inputs = [], []
        for k, w in enumerate(self.spec.widths):
            off = self.offsets[k]
            rows.append(arr[off:off + w * self.row].reshape(w, self.row))
            inputs.append(self.step_inputs(payload[off:off + w * self.row].view(w, self.row)))
        b = self.spec.buffers
        pre = arr[self.prefill_off:self.prefill_off + self.prefill_size].reshape(b.prefill_chunks, b.prefill_rows,
                                                                                  self.row)
        r = slice(self.retire_off, self.retire_off + 2 * self.retire_max)
        return PayloadViews(arr, arr[:self.header], rows, inputs, arr[r].reshape(2, self.retire_max),
                            payload[r].view(2, self.retire_max), pre)
