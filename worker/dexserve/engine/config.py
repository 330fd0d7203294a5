"""The engine's settings: one typed object (no torch here, so a worker that runs
the stand-in, and the CLI edge that builds this from flags, never import torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from dexserve.contract.limits import DEFAULT_LIMITS, Limits
from dexserve.engine.lattice import Policy

ExecutorKind = Literal["auto", "reference", "distributed"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorKind)


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


DTYPES = ("float32", "bfloat16", "float16")
AUTO_WIDTH = 8       # rows per explorer per round when the width is auto and the batch is smaller
# An auto batch (engine.memory): what the KV budget holds, at most this many per device type (a CPU's cores
# are busy long before; a GPU keeps gaining up to a few dozen rows), and the budget, a share of free memory.
AUTO_BATCH_CAP = {"cpu": 8, "cuda": 64}
FREE_SHARE = {"cpu": 0.5, "cuda": 0.85}
# The auto layout's K: two explorers, each in its own process on its own core or GPU. K=2 is the fastest
# DEX layout measured on CPU (README, "Explorers on separate devices"), and the one that needs the fewest
# devices; larger K pays off only where a segment's step dwarfs a round's coordination.
AUTO_EXPLORERS = 2


@dataclass
class EngineConfig:
    explorers: int = 0                    # depth explorers K; 0: auto (with executor auto, see laid_out)
    width: int | tuple[int, ...] = 0      # rows per explorer per round (one value, or one per explorer); 0: auto
    mode: str = "dex"
    decs: bool = True
    policy: Policy = "priority"
    max_context: int = DEFAULT_LIMITS.max_context
    max_batch: int = 0                    # requests in flight; 0: auto, what the KV budget holds (engine.memory)
    kv_memory_gib: float | None = None    # the KV budget that sizes an auto batch; None: a share of free memory
    slots: int | None = None              # lattice slots; default K*W + max_batch
    prefill_chunk: int = 32               # prompt positions per prefill step
    prefill_share: float = 1.0            # while others decode: prefill time per round on average, x a round's time (0: whole prompts at once)
    max_new_tokens: int = DEFAULT_LIMITS.max_new_tokens   # the largest max_new_tokens a request may ask for
    executor: ExecutorKind = "auto"       # reference: one process | distributed: one per explorer | auto (laid_out)
    transport: str = "auto"               # distributed: auto | shm (same-host CPU) | torch (gloo/NCCL)
    device: str = "cpu"
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16 (see resolved_dtype)
    compile: bool = False
    cuda_graphs: bool = True
    threads: int | None = None            # intra-op threads of this process (and of each explorer process)
    adapters: str = "auto"                # boundary adapters: auto (the file next to the model, if any) | none | a path

    def laid_out(self, devices: int, layers: int) -> "EngineConfig":
        """This config with its layout settled: `devices` is how many the explorers could spread over
        (CPU cores, or visible GPUs on CUDA), `layers` the model's layer count.

        Auto explorers (0): K = `AUTO_EXPLORERS` (at most `layers`). Auto executor: with auto
        explorers, one process per explorer (distributed) when there are K devices for them, else
        all K in this process; with an explicit K, this process (reference), as before: a K the user
        chose is not spread over processes unless asked (`--executor distributed`)."""
        if self.explorers < 0:
            raise ValueError(f"explorers must be >= 1 (or 0 for auto), got {self.explorers}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r} (one of {', '.join(EXECUTORS)})")
        explorers = self.explorers or min(AUTO_EXPLORERS, max(1, layers))
        executor = self.executor
        if executor == "auto":
            spread = not self.explorers and explorers > 1 and devices >= explorers
            executor = "distributed" if spread else "reference"
        return dataclasses.replace(self, explorers=explorers, executor=executor)

    def widths(self) -> tuple[int, ...]:
        """Rows per explorer step. Auto (0): `AUTO_WIDTH`, or the batch if larger,
        so that every request can move each round. Mode `ar` never spawns: each
        request has one node, so an explorer runs at most max_batch rows whatever
        W says (1 for a single stream); its steps are built that narrow."""
        if self.max_batch < 1:
            raise ValueError("max_batch is sized when the engine loads (DexEngine.load); widths() needs it")
        width = self.width or max(AUTO_WIDTH, self.max_batch)
        w = (width,) * self.explorers if isinstance(width, int) else tuple(width)
        if len(w) != self.explorers:
            raise ValueError(f"width: give one value or {self.explorers} (one per explorer), got {len(w)}")
        if min(w) < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.mode == "ar":
            w = tuple(min(x, max(1, self.max_batch)) for x in w)
        return w

    def resolved_dtype(self, checkpoint_dtype: str | None) -> str:
        """The dtype the engine computes in. `auto`: the checkpoint's own dtype
        (config.json `dtype` / `torch_dtype`) on CUDA, float32 on CPU (CPU half
        precision is slower than float32 for these kernels). Every mode equals
        `ar` in the same dtype (tests/engine/test_dtypes.py)."""
        if self.dtype not in DTYPES + ("auto",):
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.dtype != "auto":
            return self.dtype
        if self.device.startswith("cuda") and checkpoint_dtype in DTYPES:
            return checkpoint_dtype
        return "float32"

    @property
    def limits(self) -> Limits:
        return Limits(max_context=self.max_context, max_new_tokens=self.max_new_tokens)
