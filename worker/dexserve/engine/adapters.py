"""Per-boundary adapters (DEX.md, "Standard models"): the file format, its card,
the base-model hash, and the checks that keep an adapter file from being
applied to a model or a depth grid it was not trained for.

An adapter sits in front of the shared final norm and LM head at one boundary
depth d (1 <= d < L; never at the final depth, whose readout is the committed
token) and maps the hidden state h to

    full affine:  h + A h + b          tensors boundary.{d}.weight [H, H], boundary.{d}.bias [H] (optional)
    low rank R:   h + U (V h) + b      tensors boundary.{d}.up [H, R], boundary.{d}.down [R, H], boundary.{d}.bias

stored in one safetensors file (default `dex_adapters.safetensors` next to the
model). `dex train-adapter` also writes a JSON card beside it (same name,
`.json`): the base model's hash, the boundary depths, the rank, the data size,
the steps and the held-out agreement per boundary. A file with a card is
refused for another base model (hash mismatch); any file is refused when it
lacks an adapter at one of the engine's boundary depths. A file without a card
(the format that predates the card) still loads, unchecked against the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dexserve.contract.model_card import ModelCard, ModelLoadError

ADAPTER_FILE = "dex_adapters.safetensors"
CARD_FORMAT = "dex-adapters/1"
AUTO, NONE = "auto", "none"   # EngineConfig.adapters: the file next to the model if any / no adapters

# one boundary's tensors as the explorer step applies them:
# (A, None, b) full affine, (U, V, b) low rank; b may be None
AdapterTensors = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def is_adapter_file(path: Path) -> bool:
    """dex_adapters*.safetensors, or any .safetensors with an adapter card beside it."""
    if path.suffix != ".safetensors":
        return False
    if path.name.startswith("dex_adapters"):
        return True
    card = card_path(path)
    return card.is_file() and CARD_FORMAT in card.read_text(errors="replace")[:4096]


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's own weight files: the sharded index's files, or every
    *.safetensors except adapter files."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return [f for f in sorted(model_dir.glob("*.safetensors")) if not is_adapter_file(f)]


def model_hash(model_dir: Path) -> str:
    """The base model's identity: sha256 over its weight files' bytes, in name
    order (an adapter trained on these exact weights carries this value)."""
    h = hashlib.sha256()
    files = weight_files(Path(model_dir))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def card_path(adapter_file: Path) -> Path:
    return Path(adapter_file).with_suffix(".json")


@dataclass
class AdapterCard:
    """What `dex train-adapter` records beside the adapter file."""

    base_model_hash: str
    base_model: str
    boundaries: list[int]                 # depths d with an adapter
    rank: int | None                      # None = full affine
    hidden: int
    layers: int
    data_tokens: int = 0                  # training tokens seen
    steps: int = 0
    training_seconds: float = 0.0
    heldout_tokens: int = 0
    heldout_agreement: dict[str, float] = field(default_factory=dict)          # depth -> after training
    heldout_agreement_before: dict[str, float] = field(default_factory=dict)   # depth -> shared head alone
    heldout_kl: dict[str, float] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    data_source: str = "text"             # text: the user's files | self-generated: the model's own continuations
    self_generated: dict = field(default_factory=dict)   # prompts, rows, tokens, seconds, decoding (self-generated)
    settings: dict = field(default_factory=dict)
    format: str = CARD_FORMAT

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "AdapterCard":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"adapter card {path} is unreadable: {exc}") from exc
        if raw.get("format") != CARD_FORMAT:
            raise ModelLoadError(f"adapter card {path}: format {raw.get('format')!r}, want {CARD_FORMAT!r}")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise ModelLoadError(f"adapter card {path}: {exc}") from exc


@dataclass(frozen=True)
class AdapterInfo:
    """The adapters an engine runs with: what `dex generate --json` reports."""

    path: str
    sha256: str                           # of the adapter file
    boundaries: tuple[int, ...]
    rank: int | None
    base_model_hash: str | None           # from the card; None for a card-less (older) file

    def as_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "boundaries": list(self.boundaries), "rank": self.rank,
                "base_model_hash": self.base_model_hash}


def read_adapter_file(f: Path, hidden: int, layers: int, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[int, AdapterTensors]:
    """Every boundary's tensors, checked: names, depths (1..L-1), shapes."""
    from safetensors.torch import load_file

    try:
        raw = load_file(f)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ModelLoadError(f"{f}: not a safetensors adapter file: {exc}") from exc
    parts_by_depth: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "boundary" or parts[2] not in ("weight", "bias", "up", "down") \
                or not parts[1].isdigit():
            raise ModelLoadError(f"{f}: unexpected tensor {name!r}")
        depth = int(parts[1])
        if not 1 <= depth < layers:
            # the final depth's readout is the committed token: an adapter there would change the output
            raise ModelLoadError(f"{f}: {name}: adapters apply at depths 1..{layers - 1}, not {depth}")
        parts_by_depth.setdefault(depth, {})[parts[2]] = tensor
    out: dict[int, AdapterTensors] = {}

    def want(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"{f}: {name} has shape {tuple(t.shape)}, want {shape}")
        return t.to(device=device, dtype=dtype)

    for depth, p in sorted(parts_by_depth.items()):
        key = f"boundary.{depth}"
        bias = want(f"{key}.bias", p["bias"], (hidden,)) if "bias" in p else None
        if "weight" in p:
            if "up" in p or "down" in p:
                raise ModelLoadError(f"{f}: {key} has both a full weight and low-rank up/down")
            out[depth] = (want(f"{key}.weight", p["weight"], (hidden, hidden)), None, bias)
        elif "up" in p and "down" in p:
            rank = p["up"].shape[-1] if p["up"].dim() == 2 else -1
            out[depth] = (want(f"{key}.up", p["up"], (hidden, rank)), want(f"{key}.down", p["down"], (rank, hidden)),
                          bias)
        elif "up" in p or "down" in p:
            raise ModelLoadError(f"{f}: {key} needs both .up and .down (low rank), has only "
                                 f"{'.up' if 'up' in p else '.down'}")
        else:
            raise ModelLoadError(f"{f}: {key}.bias without a weight (.weight, or .up and .down)")
    return out


def write_adapter_file(path: Path, adapters: dict[int, AdapterTensors]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for depth, (w, v, b) in sorted(adapters.items()):
        if v is None:
            tensors[f"boundary.{depth}.weight"] = w
        else:
            tensors[f"boundary.{depth}.up"] = w
            tensors[f"boundary.{depth}.down"] = v
        if b is not None:
            tensors[f"boundary.{depth}.bias"] = b
    save_file({k: t.detach().float().contiguous().cpu() for k, t in tensors.items()}, str(path))


def adapter_rank(adapters: dict[int, AdapterTensors]) -> int | None:
    ranks = {None if v is None else v.shape[0] for _w, v, _b in adapters.values()}
    return ranks.pop() if len(ranks) == 1 else None


def resolve_adapters(card: ModelCard, setting: str | None, depths: Sequence[int]) -> AdapterInfo | None:
    """Which adapter file an engine over `card` with boundary depths `depths`
    runs with, checked against the model and the grid. `setting`: "auto" (or
    None) = dex_adapters.safetensors next to the model if there is one;
    "none" = no adapters; otherwise a file (or a directory holding
    dex_adapters.safetensors) that must exist."""
    setting = AUTO if setting in (None, "") else str(setting)
    if setting == NONE:
        return None
    if setting == AUTO:
        f = card.path / ADAPTER_FILE
        if not f.is_file():
            return None
    else:
        f = Path(setting)
        if f.is_dir():
            f = f / ADAPTER_FILE
        if not f.is_file():
            raise ModelLoadError(f"adapters: {f} not found (give a dex_adapters .safetensors file, or 'none')")
    hidden, layers = int(card.config["hidden_size"]), card.num_layers
    tensors = read_adapter_file(f, hidden, layers)
    have = sorted(tensors)
    cp = card_path(f)
    meta = AdapterCard.read(cp) if cp.is_file() else None
    if meta is not None:
        this = model_hash(card.path)
        if meta.base_model_hash != this:
            raise ModelLoadError(
                f"adapters {f} were trained for base model {meta.base_model!r} ({meta.base_model_hash}), "
                f"not for {card.path} ({this}): base model hash mismatch; train adapters for this model "
                f"(dex train-adapter) or pass --adapters none")
        if sorted(meta.boundaries) != have:
            raise ModelLoadError(f"adapters {f}: the card {cp} lists boundaries {sorted(meta.boundaries)}, "
                                 f"the file holds {have}")
    missing = [d for d in depths if d not in tensors]
    if missing:
        raise ModelLoadError(
            f"adapters {f} have boundaries {have}; this engine's grid reads out at depths {list(depths)}: "
            f"no adapter for depth(s) {missing} (boundary grid mismatch; train with "
            f"--boundaries {','.join(map(str, depths))} or pass --adapters none)")
    return AdapterInfo(path=str(f), sha256=file_hash(f), boundaries=tuple(have), rank=adapter_rank(tensors),
                       base_model_hash=meta.base_model_hash if meta else None)
