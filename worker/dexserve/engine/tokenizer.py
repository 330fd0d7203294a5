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
        raise ModelLoadError(f"{card.path}: tokenizer failed to load: {exc}") from exc
