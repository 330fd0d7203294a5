"""A transformers older than the checkpoint's (the GPU machine's preinstalled one)
cannot build tokenizer_class TokenizersBackend (5.x): the engine falls back to the
same tokenizer.json through the generic fast tokenizer, with the same ids."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import transformers

from dexserve.contract.model_card import ModelCard, ModelLoadError
from dexserve.engine.tokenizer import load_tokenizer

def test_fallback_when_auto_tokenizer_fails(monkeypatch):
    card = ModelCard.load(None)
    auto = load_tokenizer(card)

    def old_transformers(*args, **kwargs):
        raise ValueError("Tokenizer class TokenizersBackend does not exist or is not currently imported.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", old_transformers)
    fallback = load_tokenizer(card)
    rows = [json.loads(line) for line in (card.path / "heldout_prompts.jsonl").read_text().splitlines() if line.strip()]
    for r in rows[:20]:
        ids = auto(r["prompt"], add_special_tokens=False)["input_ids"]
        assert fallback(r["prompt"], add_special_tokens=False)["input_ids"] == ids
        assert fallback.decode(ids) == auto.decode(ids)
    assert fallback.eos_token_id == auto.eos_token_id and fallback.pad_token == auto.pad_token


def test_no_tokenizer_at_all_is_still_a_load_error(monkeypatch, tmp_path):
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no tokenizer files")))
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(SimpleNamespace(path=tmp_path))  # an empty folder: nothing to fall back to


def test_fallback_keeps_the_chat_template(monkeypatch, tmp_path):
    """Chat needs the template: the fallback takes it from tokenizer_config.json or chat_template.jinja."""
    import shutil

    card = ModelCard.load(None)
    shutil.copy(card.path / "tokenizer.json", tmp_path / "tokenizer.json")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("TokenizersBackend")))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(SimpleNamespace(path=tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template.replace("<", "[")}))
    tok = load_tokenizer(SimpleNamespace(path=tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user>hi"
