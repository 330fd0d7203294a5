"""`InstantEngine`: the Engine interface with no model behind it.

It commits one deterministic token per request per step (optionally after a
sleep), so service tests and the service benchmark measure the queue and the
gateway, not the model. Tokens depend only on (prompt, seed if sampling,
index): a restarted request reproduces them exactly, like the real engine.
`poison`: a prompt containing it makes `add` raise, to exercise dead-lettering.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dexserve.engine.model_card import ModelCard
from dexserve.engine.request import Finished, FinishReason, GenerationRequest, StepResult, TokenEvent
from dexserve.engine.validation import Limits, validate_request


@dataclass
class _Active:
    req: GenerationRequest
    prompt_tokens: int
    produced: int = 0
    text: str = ""


class _FastTokenizer:
    """The checkpoint's tokenizer.json through `tokenizers` (no transformers import)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


class InstantEngine:
    def __init__(self, card: ModelCard, config, step_delay_s: float = 0.0, poison: str | None = None) -> None:
        self.card = card
        self.config = config
        self.tokenizer = _FastTokenizer(card.path / "tokenizer.json")
        self.limits = Limits(max_context=config.max_context, max_new_tokens=config.max_new_tokens)
        self.step_delay_s = step_delay_s
        self.poison = poison
        self._active: dict[str, _Active] = {}
        self._round = 0

    @classmethod
    def load(cls, model_dir: str | None, config, **options) -> "InstantEngine":
        return cls(ModelCard.load(model_dir), config, **options)

    @property
    def active(self) -> int:
        return len(self._active)

    def _prompt_tokens(self, req: GenerationRequest) -> int:
        return len(req.prompt_ids) if req.prompt_ids is not None else len(self.tokenizer.encode(req.prompt))

    def validate(self, req: GenerationRequest) -> None:
        validate_request(req, self.limits, self._prompt_tokens(req))

    def has_capacity(self) -> bool:
        return len(self._active) < self.config.max_batch

    def add(self, req: GenerationRequest) -> None:
        self.validate(req)
        if self.poison and self.poison in req.prompt:
            raise RuntimeError(f"stand-in engine poisoned by prompt of {req.request_id}")
        self._active[req.request_id] = _Active(req, self._prompt_tokens(req))

    def cancel(self, request_id: str) -> Finished | None:
        st = self._active.pop(request_id, None)
        if st is None:
            return None
        return Finished(request_id, FinishReason.CANCELLED, st.prompt_tokens, st.produced)

    def token_at(self, req: GenerationRequest, index: int) -> int:
        s = req.sampling
        key = f"{req.prompt}|{index}" if s.greedy else f"{req.prompt}|{index}|{s.seed}|{s.temperature}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % max(self.card.vocab_size, 1)

    def step(self) -> StepResult:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self._round += 1
        out = StepResult(record=None)
        for rid, st in list(self._active.items()):
            tok = self.token_at(st.req, st.produced)
            text = f" t{tok}"
            out.tokens.append(TokenEvent(rid, st.produced, tok, text))
            st.produced += 1
            st.text += text
            reason = None
            if any(s in st.text for s in st.req.stop):
                reason = FinishReason.STOP
            elif st.produced >= st.req.max_new_tokens:
                reason = FinishReason.LENGTH
            elif st.prompt_tokens + st.produced >= self.limits.max_context:
                reason = FinishReason.CONTEXT
            if reason is not None:
                del self._active[rid]
                out.finished.append(Finished(rid, reason, st.prompt_tokens, st.produced))
        return out


def write_standin_model(path: Path, source: str | None = None) -> Path:
    """A checkpoint directory the stand-in (and the gateway) can serve: a real
    config and tokenizer, and a one-tensor weights file (never loaded)."""
    import numpy as np
    from safetensors.numpy import save_file

    from dexserve.engine.model_card import shipped_model_dir

    src = Path(source) if source else shipped_model_dir()
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            (path / name).write_bytes((src / name).read_bytes())
    vocab = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "eos_token_id": 0}))
    save_file({"standin": np.zeros(1, dtype=np.float32)}, str(path / "model.safetensors"))
    return path
