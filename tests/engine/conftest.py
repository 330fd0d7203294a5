from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: threads only add contention on 2 cores

from dexserve.contract.model_card import shipped_model_dir  # noqa: E402
from tiny_models import save_tiny  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f, layers=4, seed=i) for i, f in enumerate(FAMILIES)}


def shipped_available() -> bool:
    return (shipped_model_dir() / "model.safetensors").is_file()


@functools.lru_cache(maxsize=None)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=4096)
def hf_greedy(path: str, prompt: tuple[int, ...], new_tokens: int) -> tuple[int, ...]:
    """Hugging Face generate(do_sample=False): the reference every mode must equal."""
    model = _hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return tuple(out[0, len(prompt):].tolist())


@functools.lru_cache(maxsize=None)
def hf_logits(path: str, prompt: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(path)(torch.tensor([prompt])).logits[0, -1].float()
