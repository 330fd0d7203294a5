"""Driving an engine in tests: a batch of prompts decoded together, each request's tokens."""

from __future__ import annotations

from dexserve.contract.request import GenerationRequest, SamplingParams
from dexserve.engine.engine import DexEngine


def decode(eng: DexEngine, prompts, sampling: SamplingParams, new: int = 14) -> list[list[int]]:
    """All prompts together (batch mix), each request's committed tokens."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.add(GenerationRequest(f"p{i}", prompt_ids=p, max_new_tokens=new, ignore_eos=True, sampling=sampling))
        out[f"p{i}"] = []
    while eng.active:
        for ev in eng.step().tokens:
            out[ev.request_id].append(ev.token_id)
    return [out[f"p{i}"] for i in range(len(prompts))]
