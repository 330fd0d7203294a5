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
    # self-generated data: the base model's own continuations of prompts (from `prompts`, else from `data`)
    self_generate: int | None = None      # at most this many continuations; None: train on `data` itself
    prompts: str | None = None            # JSONL of {"prompt": ...} (or "text"); default: windows of `data`
    prompt_tokens: int = 32               # a prompt's length (its last tokens; a window of `data`)
    generate_tokens: int = 224            # tokens generated per prompt (EOS ignored)
    generate_share: float = 0.3           # with `minutes`: the share of the budget generation may take
    generate_batch: int = 32              # prompts continued together
    temperature: float = 0.0              # 0: greedy; else sampled (seeded by `seed`)

    def check(self) -> None:
        if not self.data and not (self.self_generate is not None and self.prompts):
            raise AdapterTrainingError("--data: give at least one text or .jsonl file "
                                       "(or --self-generate N with --prompts FILE)")
        for f in self.data:
            if not Path(f).is_file():
                raise AdapterTrainingError(f"--data: {f} is not a file")
        self.check_self_generate()
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

    def check_self_generate(self) -> None:
        if self.self_generate is None:
            if self.prompts:
                raise AdapterTrainingError("--prompts: only with --self-generate N (prompts the model continues)")
            return
        if self.self_generate < 1:
            raise AdapterTrainingError(f"--self-generate must be >= 1 (continuations), got {self.self_generate}")
        if self.prompts and not Path(self.prompts).is_file():
            raise AdapterTrainingError(f"--prompts: {self.prompts} is not a file")
        for name in ("prompt_tokens", "generate_tokens", "generate_batch"):
            if getattr(self, name) < 1:
                raise AdapterTrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.generate_share < 1:
            raise AdapterTrainingError(f"--generate-share must be in (0, 1), got {self.generate_share}")
        if self.temperature < 0:
            raise AdapterTrainingError(f"--temperature must be >= 0, got {self.temperature}")

    def self_generate_key(self) -> dict:
        """What self-generated data depends on (a resumed run reuses the file only if these agree)."""
        if self.self_generate is None:
            return {}
        return {"self_generate": self.self_generate, "prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
                "generate_tokens": self.generate_tokens, "generate_share": self.generate_share,
                "generate_batch": self.generate_batch, "temperature": self.temperature}

    def resume_key(self) -> dict:
        """What a checkpoint must agree on to be continued."""
        return {"data": list(self.data), "rank": self.rank, "batch": self.batch, "seq": self.seq, "lr": self.lr,
                "warmup": self.warmup, "seed": self.seed, "heldout_every": self.heldout_every,
                "shuffle_buffer": self.shuffle_buffer, "steps": self.steps, "minutes": self.minutes,
                **self.self_generate_key()}
