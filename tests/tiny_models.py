"""Tiny randomly initialised checkpoints of each supported family, saved the
way users have them: a local directory with config, safetensors and a tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dexserve.contract.model_card import shipped_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_tiny(family: str, path: Path, layers: int = 4, seed: int = 0, vocab: int = 2048, eos: bool = True) -> Path:
    """`eos=False` saves a model with no end-of-sequence token, so every request
    runs to max_new_tokens (service tests compare full lengths)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=24))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=64))
    else:
        raise ValueError(family)
    model.save_pretrained(path, safe_serialization=True)
    src = shipped_model_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, path / name)
    if not eos:
        conf = json.loads((path / "config.json").read_text())
        conf["eos_token_id"] = None
        (path / "config.json").write_text(json.dumps(conf))
        (path / "generation_config.json").unlink(missing_ok=True)
    return path


# A ChatML template of the kind chat checkpoints ship (Qwen's family), using what transformers gives a
# template: the special tokens (bos_token), raise_exception, loop variables, add_generation_prompt.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def with_chat_template(path: Path, template: str = CHATML_TEMPLATE) -> Path:
    """Give the checkpoint at `path` a chat template, where transformers keeps it (tokenizer_config.json)."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    cfg_path.unlink(missing_ok=True)          # a new file: never write through a link to the original
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint directory (weights hard-linked when the filesystem allows; they are
    only read)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.is_file():
            continue
        try:
            if f.suffix != ".safetensors":
                raise OSError("copied")
            (dst / f.name).hardlink_to(f)
        except OSError:
            shutil.copy(f, dst / f.name)
    return dst
