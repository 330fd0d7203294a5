"""The checkpoint's full tokenizer (transformers), for encoding and detokenizing.

The gateway counts prompt tokens with `ModelCard.prompt_tokenizer()` (the same
tokenizer.json through `tokenizers`, no transformers); the engine needs the
full tokenizer for decoding text and for checkpoints with only a SentencePiece
model.
"""

from __future__ import annotations

import json
import os

from dexserve.contract.model_card import ModelCard, ModelLoadError


def load_tokenizer(card: ModelCard):
    """The checkpoint's own tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(card.path, local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        try:  # a transformers older than the checkpoint's (tokenizer_class TokenizersBackend is 5.x's)
            return _fast_tokenizer(card)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise ModelLoadError(f"{card.path}: tokenizer failed to load: {exc}") from exc


def _fast_tokenizer(card: ModelCard):
    """The checkpoint's tokenizer.json through the generic fast tokenizer, with the
    special tokens and chat template of its tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    cfg_file = card.path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tok = cfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str):
            special[key] = tok
    for key in ("model_max_length", "chat_template"):
        if key in cfg:
            special[key] = cfg[key]
    template = card.path / "chat_template.jinja"   # newer checkpoints keep the template beside the config
    if "chat_template" not in special and template.is_file():
        special["chat_template"] = template.read_text()
    return PreTrainedTokenizerFast(tokenizer_file=str(card.path / "tokenizer.json"), **special)


class _BackendDecoder:
    """`decode` straight through the Rust tokenizer: transformers' own `decode`
    spends most of its time in Python argument handling around this same call."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def text_decoder(tokenizer):
    """What the engine detokenizes committed tokens with (it decodes a request's
    ids once per commit): the fast tokenizer's backend when transformers' decode
    would return exactly what the backend returns (no clean-up of tokenization
    spaces), else the tokenizer itself."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, Tokenizer) and getattr(tokenizer, "clean_up_tokenization_spaces", None) is False:
        return _BackendDecoder(backend)
    return tokenizer
