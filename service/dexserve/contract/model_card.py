"""What a checkpoint directory is, read without loading its weights.

The gateway validates requests against the card (context length, tokenizer)
without torch; the engine loads weights on top of it. Nothing is ever fetched
from a hub: every path is a local directory and a missing piece is an error
that names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dexserve.contract.chat import ChatTemplate
    from dexserve.contract.limits import Limits

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SHIPPED_MODEL = "dexcode-6m"


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be served, with the reason."""


def shipped_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / SHIPPED_MODEL


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """`None` (or the shipped model's name) means the model this project ships."""
    if model is None or str(model) == SHIPPED_MODEL:
        return shipped_model_dir()
    return Path(model)


@dataclass(frozen=True)
class ModelCard:
    name: str
    path: Path
    model_type: str
    num_layers: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    config: dict

    @property
    def dtype(self) -> str | None:
        """The dtype the checkpoint was saved in (config.json `dtype`, or the older `torch_dtype`)."""
        return self.config.get("dtype") or self.config.get("torch_dtype")

    @classmethod
    def load(cls, model: str | os.PathLike | None) -> "ModelCard":
        path = resolve_model_dir(model)
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}") from exc
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if not (list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
            raise ModelLoadError(f"{path} has no *.safetensors weights")
        if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
            raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model)")
        eos = config.get("eos_token_id")
        gen_cfg = path / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(name=path.name, path=path, model_type=model_type,
                   num_layers=int(config["num_hidden_layers"]), vocab_size=int(config["vocab_size"]),
                   max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                   eos_token_ids=eos_ids, config=config)

    def prompt_tokenizer(self) -> "PromptTokenizer | None":
        """The checkpoint's `tokenizer.json` through `tokenizers` (no transformers,
        no torch): what the gateway and the stand-in count prompt tokens with.
        None when the checkpoint has only a SentencePiece `tokenizer.model`; then
        only the engine, which loads the full tokenizer, can count."""
        path = self.path / "tokenizer.json"
        return PromptTokenizer(path) if path.is_file() else None

    def chat_template(self) -> "ChatTemplate | None":
        """The checkpoint's own chat template (`dexserve.contract.chat`), None when it has none."""
        from dexserve.contract.chat import ChatTemplate, ChatTemplateError

        try:
            return ChatTemplate.from_dir(self.path)
        except ChatTemplateError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from exc


class PromptTokenizer:
    """Encodes a prompt exactly as the engine does: no special tokens added (the
    engine's transformers tokenizer wraps the same tokenizer.json)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception types
            raise ModelLoadError(f"{path}: tokenizer failed to load: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens spelled out; a partial UTF-8 sequence as U+FFFD):
        what log-probability listings show for it."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for: through the byte-level alphabet when the
        tokenizer is byte-level BPE (so a token holding part of a UTF-8 character gives
        its real bytes), else its text's UTF-8."""
        piece = self._tok.id_to_token(token_id)
        table = self._byte_table()
        if table is not None and piece is not None and token_id not in self._added_ids():
            try:
                return bytes(table[c] for c in piece)
            except KeyError:
                pass
        return self.token_text(token_id).encode("utf-8")

    def _byte_table(self) -> dict[str, int] | None:
        if not hasattr(self, "_bytes_of"):
            import json

            decoder = json.loads(self._tok.to_str()).get("decoder") or {}
            self._bytes_of = _byte_level_alphabet() if decoder.get("type") == "ByteLevel" else None
        return self._bytes_of

    def _added_ids(self) -> set[int]:
        if not hasattr(self, "_added"):
            self._added = set(self._tok.get_added_tokens_decoder())
        return self._added


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# --- The release's model card in Redis --------------------------------------------------------
# Every worker publishes `card_summary(...)` at start (key `QueueNames.model_card`); the gateway
# computes the same summary from its own checkpoint and limits and compares fingerprints, so a
# gateway never validates or counts tokens for a model the workers do not serve.

CARD_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "generation_config.json")


def card_summary(card: ModelCard, limits: "Limits") -> dict:
    """What gateway and workers must agree on: the checkpoint's identity (name, architecture,
    a hash of its config and tokenizer files) and the serving limits. Weights are not hashed
    (gigabytes); a checkpoint whose config and tokenizer match is the same model to the gateway."""
    import hashlib

    digest = hashlib.sha256()
    for fname in CARD_FILES:
        f = card.path / fname
        if f.is_file():
            digest.update(fname.encode() + b"\0" + f.read_bytes() + b"\0")
    return {"name": card.name, "model_type": card.model_type, "num_layers": card.num_layers,
            "vocab_size": card.vocab_size, "files_sha256": digest.hexdigest(),
            "max_context": limits.max_context, "max_new_tokens": limits.max_new_tokens}


def card_fingerprint(summary: dict) -> str:
    """One function for both sides: a stable hash of a card summary (sorted JSON)."""
    import hashlib

    return hashlib.sha256(json.dumps(summary, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def card_json(card: ModelCard, limits: "Limits", *, logprobs: bool = False) -> str:
    """The card a worker publishes (`QueueNames.model_card`): its summary plus the fingerprint,
    and what its engine can do beyond the contract (`capabilities`; not part of the fingerprint:
    the gateway reads it to refuse early what the workers would refuse)."""
    summary = card_summary(card, limits)
    return json.dumps({**summary, "fingerprint": card_fingerprint(summary),
                       CAPABILITIES: {"logprobs": bool(logprobs)}})


CAPABILITIES = "capabilities"


def card_capabilities(published: dict | None) -> dict:
    """The capabilities of a published card ({} when no worker has published one, or an older
    worker published a card without them)."""
    return dict((published or {}).get(CAPABILITIES) or {})


def card_difference(ours: dict, theirs: dict) -> str:
    """Human-readable list of the fields two summaries disagree on ('' when equal)."""
    keys = sorted(set(ours) | set(theirs))
    return ", ".join(f"{k}: gateway {ours.get(k)!r} != workers {theirs.get(k)!r}"
                     for k in keys if ours.get(k) != theirs.get(k))
