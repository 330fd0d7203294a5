"""The checkpoint's full tokenizer (transformers), for encoding and detokenizing.

The gateway counts prompt tokens with `ModelCard.prompt_tokenizer()` (the same
tokenizer.json through `tokenizers`, no transformers); the engine needs the
full tokenizer for decoding text and for checkpoints with only a SentencePiece
model.
"""

from __future__ import annotations

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
    special tokens of its tokenizer_config.json."""
    import json

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
    if "model_max_length" in cfg:
        special["model_max_length"] = cfg["model_max_length"]
    return PreTrainedTokenizerFast(tokenizer_file=str(card.path / "tokenizer.json"), **special)
