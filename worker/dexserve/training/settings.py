"""The settings of `dex train-adapter`: one typed object, no torch (the CLI edge
reads its defaults while building the parser)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class AdapterTrainingError(ValueError):
    """Bad settings or data, with the field or file named."""


@dataclass(frozen=True)
class AdapterTrainingSettings:
    """Everything `dex train-adapter` decides (built from flags at the CLI edge)."""

    model: str | None
    data: tuple[str, ...]
    explorers: int | None = None          # the K-explorer grid's boundary depths ...
    boundaries: tuple[int, ...] = ()      # ... plus any depths asked for explicitly
    rank: int | None = None               # None: full affine; R: h + U(V h) + b
    steps: int | None = None              # stop after this many steps ...
    minutes: float | None = None          # ... or this much wall time (one of the two)
    out: str | None = None                # default: dex_adapters.safetensors next to the model
    resume: bool = False
    batch: int = 8
    seq: int = 256
    lr: float = 5e-3
    warmup: int = 20
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = 50
    heldout_every: int = 20
    heldout_sequences: int = 32
    shuffle_buffer: int = 256
    progress: bool = True

    def check(self) -> None:
        if not self.data:
            raise AdapterTrainingError("--data: give at least one text or .jsonl file")
        for f in self.data:
            if not Path(f).is_file():
                raise AdapterTrainingError(f"--data: {f} is not a file")
        if (self.steps is None) == (self.minutes is None):
            raise AdapterTrainingError("give exactly one of --steps N or --minutes N")
        if self.steps is not None and self.steps < 1:
            raise AdapterTrainingError(f"--steps must be >= 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise AdapterTrainingError(f"--minutes must be > 0, got {self.minutes}")
        if self.rank is not None and self.rank < 1:
            raise AdapterTrainingError(f"--rank must be >= 1, got {self.rank}")
        if self.explorers is None and not self.boundaries:
            raise AdapterTrainingError("give --explorers K and/or --boundaries D,D,...")
        for name in ("batch", "seq", "checkpoint_every", "heldout_every", "heldout_sequences", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise AdapterTrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def resume_key(self) -> dict:
        """What a checkpoint must agree on to be continued."""
        return {"data": list(self.data), "rank": self.rank, "batch": self.batch, "seq": self.seq, "lr": self.lr,
                "warmup": self.warmup, "seed": self.seed, "heldout_every": self.heldout_every,
                "shuffle_buffer": self.shuffle_buffer, "steps": self.steps, "minutes": self.minutes}
