"""`InstantEngine`: the `Engine` interface (dexserve.contract.engine) with no model behind it.

It commits one deterministic token per request per step (optionally after a
sleep), so service tests and the service benchmark measure the queue and the
gateway, not the model. Tokens depend only on (prompt, seed if sampling,
index): a restarted request reproduces them exactly, like the real engine;
so do the log-probabilities it reports when a request asks (`logprobs_at`).
Token N reads ` tN` (`StandinText`), through the contract's stop-string handling.
`poison`: a prompt containing it makes `add` raise, to exercise dead-lettering.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dexserve.contract.model_card import ModelCard, ModelLoadError
from dexserve.contract.request import Finished, FinishReason, GenerationRequest, StepResult, TokenEvent, finish_reason
from dexserve.contract.engine import EngineInfo
from dexserve.contract.limits import DEFAULT_LIMITS, Limits
from dexserve.contract.text import TextStream
from dexserve.contract.validation import validate_request


class StandinText:
    """The stand-in's detokenizer: token id N reads ` tN`. Its text goes through the contract's
    `TextStream`, so stop strings behave as with the real engine (the text ends before the stop
    string; a tail that could still become one is held back)."""

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" t{i}" for i in ids)


@dataclass
class _Active:
    req: GenerationRequest
    prompt_tokens: int
    text: TextStream
    produced: int = 0


class InstantEngine:
    def __init__(self, card: ModelCard, limits: Limits = DEFAULT_LIMITS, max_batch: int = 4, step_delay_s: float = 0.0,
                 poison: str | None = None, logprobs: bool = True) -> None:
        self.card = card
        self.max_batch = max_batch
        self.tokenizer = card.prompt_tokenizer()
        if self.tokenizer is None:
            raise ModelLoadError(f"{card.path}: the stand-in engine needs a tokenizer.json")
        self.limits = limits
        self.step_delay_s = step_delay_s
        self.poison = poison
        self.logprobs = logprobs
        self._active: dict[str, _Active] = {}
        self._round = 0

    @classmethod
    def load(cls, model_dir: str | None, limits: Limits = DEFAULT_LIMITS, **options) -> "InstantEngine":
        return cls(ModelCard.load(model_dir), limits, **options)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(model=self.card.name, engine="standin", logprobs=self.logprobs, max_batch=self.max_batch)

    def close(self) -> None:
        self._active.clear()

    @property
    def active(self) -> int:
        return len(self._active)

    def _prompt_tokens(self, req: GenerationRequest) -> int:
        return len(req.prompt_ids) if req.prompt_ids is not None else len(self.tokenizer.encode(req.prompt))

    def validate(self, req: GenerationRequest) -> None:
        validate_request(req, self.limits, self._prompt_tokens(req))

    def has_capacity(self) -> bool:
        return len(self._active) < self.max_batch

    def add(self, req: GenerationRequest) -> None:
        self.validate(req)
        if self.poison and self.poison in req.prompt:
            raise RuntimeError(f"stand-in engine poisoned by prompt of {req.request_id}")
        self._active[req.request_id] = _Active(req, self._prompt_tokens(req), TextStream(StandinText, req.stop))

    def cancel(self, request_id: str) -> Finished | None:
        st = self._active.pop(request_id, None)
        if st is None:
            return None
        return Finished(request_id, FinishReason.CANCELLED, st.prompt_tokens, st.produced)

    def _digest(self, req: GenerationRequest, index: int) -> int:
        s = req.sampling
        key = f"{req.prompt}|{index}" if s.greedy else f"{req.prompt}|{index}|{s.seed}|{s.temperature}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    def token_at(self, req: GenerationRequest, index: int) -> int:
        return self._digest(req, index) % max(self.card.vocab_size, 1)

    def logprobs_at(self, req: GenerationRequest, index: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        """Deterministic stand-ins for the log-probabilities (exact in float32, so they cross the
        queue unchanged): the committed token ranks first with -k/1024 (k from the same hash),
        then `req.logprobs - 1` other ids, each 0.5 lower."""
        token = self.token_at(req, index)
        vocab = max(self.card.vocab_size, 1)
        first = -((self._digest(req, index) >> 20) % 1000 + 1) / 1024
        ranked = [token]
        step = 1
        while len(ranked) < min(req.logprobs or 0, vocab):
            alt = (token + step * 7919) % vocab
            step += 1
            if alt not in ranked:
                ranked.append(alt)
        return first, tuple((t, first - 0.5 * r) for r, t in enumerate(ranked))[:req.logprobs or 0]

    def step(self) -> StepResult:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self._round += 1
        out = StepResult(record=None)
        for rid, st in list(self._active.items()):
            tok = self.token_at(st.req, st.produced)
            delta, stopped = st.text.push(tok)
            logprob, top = self.logprobs_at(st.req, st.produced) if st.req.logprobs is not None else (None, ())
            out.tokens.append(TokenEvent(rid, st.produced, tok, delta, logprob, top))
            st.produced += 1
            reason = finish_reason(stopped=stopped, eos=False, generated=st.produced,
                                   max_new_tokens=st.req.max_new_tokens, prompt_tokens=st.prompt_tokens,
                                   max_context=self.limits.max_context)
            if reason is not None:
                del self._active[rid]
                tail = st.text.flush() if reason is not FinishReason.STOP else ""
                out.finished.append(Finished(rid, reason, st.prompt_tokens, st.produced, tail))
        return out


def write_standin_model(path: Path, source: str | None = None) -> Path:
    """A checkpoint directory the stand-in (and the gateway) can serve: a real
    config and tokenizer, and a one-tensor weights file (never loaded)."""
    import numpy as np
    from safetensors.numpy import save_file

    from dexserve.contract.model_card import shipped_model_dir

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
