"""Self-generated adapter data (`dex train-adapter --self-generate N`): the
base model's own continuations of prompts, the text DEX.md asks adapters to
match the final depth on ("on the model's own outputs").

Prompts are the `--prompts` file's (JSONL, a `prompt` or `text` field per
line, each cut to its last `prompt_tokens` tokens) or windows of the `--data`
files: one per .jsonl row and one per `seq` tokens of a plain text file, each
`prompt_tokens` long at a seeded random place. The frozen base model (the
Hugging Face model the distiller already holds) continues `generate_batch`
prompts at a time for `generate_tokens` tokens with its KV cache, greedy or
sampled at `temperature`, EOS ignored (a greedy row is what `ar` decodes with
`ignore_eos`). Rows are written as they come, as JSONL (`text`, and the token
`ids` with the prompt's length) beside the adapter file, and training then
streams that file like any other `--data`. Generation stops at N rows, when
the prompts run out, or (with `--minutes`) after `generate_share` of the
wall-clock budget, which the training that follows does not get again.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from dexserve.training.settings import AdapterTrainingError, AdapterTrainingSettings

FORMAT = "dex-selfgen/1"


def data_path(out: Path) -> Path:
    """The generated rows, beside the adapter file."""
    return Path(out).with_suffix(".selfgen.jsonl")


def meta_path(out: Path) -> Path:
    return Path(out).with_suffix(".selfgen.json")


@dataclass
class SelfGenerated:
    """What the card records about self-generated data."""

    file: str
    prompts_from: list[str]               # the --prompts file, or the --data files windows were cut from
    rows: int = 0
    tokens: int = 0                       # generated tokens (prompts not counted)
    seconds: float = 0.0
    stopped: str = ""                     # rows (N reached) | prompts (none left) | time (budget share spent)
    decoding: str = "greedy"
    settings: dict = field(default_factory=dict)
    format: str = FORMAT


def prompts(s: AdapterTrainingSettings, tokenizer, eos: int | None) -> Iterator[list[int]]:
    """Prompt token ids, in file order (deterministic given the settings)."""
    from dexserve.training.adapters import iter_documents, iter_sequences, jsonl_texts

    P = s.prompt_tokens
    if s.prompts:
        for text in jsonl_texts(Path(s.prompts), ("prompt", "text"), "--prompts"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][-P:]
            if ids:
                yield ids
        return
    rng = random.Random(s.seed)
    for name in s.data:
        if Path(name).suffix == ".jsonl":     # one prompt per row (document)
            for text, _end in iter_documents([name]):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if ids:
                    start = rng.randrange(max(1, len(ids) - P + 1))
                    yield ids[start:start + P]
        else:                                 # one document: a prompt per `seq` tokens of it
            for ids in iter_sequences([name], tokenizer, s.seq, eos):
                start = rng.randrange(max(1, len(ids) - P + 1))
                yield ids[start:start + P]


@torch.no_grad()
def continue_batch(model, batch: list[list[int]], s: AdapterTrainingSettings, pad: int) -> list[list[int]]:
    """Each prompt followed by `generate_tokens` tokens of the model's own (left-padded batch, KV cache)."""
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], dtype=torch.long)
    sample = {"do_sample": True, "temperature": s.temperature, "top_k": 0, "top_p": 1.0} if s.temperature > 0 \
        else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.generate_tokens,
                         min_new_tokens=s.generate_tokens, eos_token_id=None, pad_token_id=pad, **sample)
    return [b + out[i, width:].tolist() for i, b in enumerate(batch)]


def generate(model, tokenizer, s: AdapterTrainingSettings, out: Path, eos: int | None,
             seconds: float | None) -> SelfGenerated:
    """Write up to `s.self_generate` rows to `data_path(out)`; stop after `seconds` (None: no limit)."""
    from tqdm import tqdm

    target = data_path(out)
    tmp = target.with_suffix(".jsonl.tmp")
    meta = SelfGenerated(file=str(target), prompts_from=[s.prompts] if s.prompts else [str(Path(f)) for f in s.data],
                         decoding="greedy" if s.temperature == 0 else f"sampled, temperature {s.temperature:g}",
                         settings=s.self_generate_key(), stopped="prompts")
    torch.manual_seed(s.seed)
    pad = eos if eos is not None else 0
    bar = tqdm(total=s.self_generate, disable=not s.progress, unit="row", dynamic_ncols=True,
               desc="self-generating" + (f" (up to {seconds / 60:.1f} min)" if seconds else ""))
    t0 = time.monotonic()
    source = prompts(s, tokenizer, eos)
    with open(tmp, "w", encoding="utf-8") as fh:
        while True:
            batch = [ids for _, ids in zip(range(min(s.generate_batch, s.self_generate - meta.rows)), source)]
            if not batch:
                break
            for row in continue_batch(model, batch, s, pad):
                n = len(row) - s.generate_tokens
                fh.write(json.dumps({"text": tokenizer.decode(row), "ids": row, "prompt_tokens": n}) + "\n")
            fh.flush()
            meta.rows += len(batch)
            meta.tokens += len(batch) * s.generate_tokens
            bar.update(len(batch))
            if meta.rows >= s.self_generate:
                meta.stopped = "rows"
                break
            if seconds is not None and time.monotonic() - t0 >= seconds:
                meta.stopped = "time"
                break
    bar.close()
    meta.seconds = round(time.monotonic() - t0, 1)
    if meta.rows == 0:
        raise AdapterTrainingError("--self-generate: no prompts: "
                                   + (f"--prompts {s.prompts} is empty" if s.prompts else "--data holds no text"))
    tmp.replace(target)
    meta_path(out).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def reuse(out: Path, s: AdapterTrainingSettings) -> SelfGenerated | None:
    """A finished earlier generation with these settings (a resumed run continues on the same rows)."""
    f = meta_path(out)
    if not f.is_file() or not data_path(out).is_file():
        return None
    raw = json.loads(f.read_text())
    if raw.get("format") != FORMAT or raw.get("settings") != s.self_generate_key():
        return None
    return SelfGenerated(**raw)
