"""`dex train-adapter`: boundary adapters for a checkpoint that was not trained
for early exit (DEX.md, "Standard models"; the paper's "inducing adapter").

The base model stays frozen. For every boundary depth d the adapter maps the
hidden state h_d to h_d + A h_d + b (full affine) or h_d + U (V h_d) + b
(low rank R) in front of the model's own final norm and LM head, and is
trained to make that readout's next-token distribution match the final
layer's: the loss is KL(p_final || q_d) per position, on the user's text
(plain text files, or JSONL with a `text` field), streamed.

Data. Files are read lazily, tokenized in pieces and cut into sequences of
`seq` tokens (EOS between documents); a bounded shuffle buffer mixes them.
Every `heldout_every`-th sequence of the stream (the first one included) is
held out: never trained on, and the first `heldout_sequences` of them measure
the card's held-out agreement (top-1 of the adapted readout equal to the
final layer's top-1, teacher-forced on the text) before and after training.
The corpus is never held in memory: a larger-than-memory file works.

Determinism and resume. The stream, the shuffle and the initialisation are
seeded, and a checkpoint (adapters, optimiser, step, elapsed time) is written
every `checkpoint_every` steps and on interruption (Ctrl-C). `--resume`
reloads it, replays the data stream up to the step it reached (tokenizing
again, without running the model) and continues: with `--steps` the result
equals the uninterrupted run's. With `--minutes` the learning-rate schedule
runs on wall time, so a run is reproducible in kind, not bit for bit.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dexserve.contract.model_card import ModelCard
from dexserve.engine.adapters import (ADAPTER_FILE, AdapterCard, AdapterTensors, card_path, model_hash,
                                      resolve_adapters, write_adapter_file)
from dexserve.engine.executor import even_boundaries
from dexserve.training.settings import AdapterTrainingError, AdapterTrainingSettings

__all__ = ["AdapterTrainingError", "AdapterTrainingSettings", "train"]

CHECKPOINT_FORMAT = "dex-adapter-checkpoint/1"
TEXT_PIECE = 1 << 16      # characters of a plain-text file tokenized at a time


def training_depths(layers: int, explorers: int | None, extra: Sequence[int]) -> tuple[int, ...]:
    """The boundary depths to train: the K-explorer grid's (b_1 .. b_{K-1}) and any extra ones."""
    depths = set(extra)
    if explorers is not None:
        if not 2 <= explorers <= layers:
            raise AdapterTrainingError(f"--explorers: K={explorers} must be in 2..{layers} (the model's layers)")
        depths |= set(even_boundaries(layers, explorers)[1:-1])
    bad = sorted(d for d in depths if not 1 <= d < layers)
    if bad:
        raise AdapterTrainingError(f"--boundaries: depth(s) {bad} outside 1..{layers - 1} (adapters never apply at "
                                   f"the final depth {layers}, whose readout is the committed token)")
    return tuple(sorted(depths))


# ---- data -------------------------------------------------------------------

def jsonl_texts(path: Path, fields: Sequence[str], flag: str) -> Iterator[str]:
    """The first of `fields` that is a string, per non-blank line of a JSONL file (errors name `flag` and the line)."""
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AdapterTrainingError(f"{flag}: {path}:{i}: not JSON ({exc})") from exc
            text = next((row[f] for f in fields if isinstance(row, dict) and isinstance(row.get(f), str)), None)
            if text is None:
                raise AdapterTrainingError(f"{flag}: {path}:{i}: no string field "
                                           + " (or ".join(f"'{f}'" for f in fields) + ")" * (len(fields) - 1))
            yield text


def iter_documents(files: Sequence[str]) -> Iterator[tuple[str, bool]]:
    """(text piece, ends a document) over the files, lazily: a .jsonl file is one
    document per line (its `text` field), any other file is one document read in
    pieces of about TEXT_PIECE characters cut at line ends."""
    for name in files:
        path = Path(name)
        if path.suffix == ".jsonl":
            yield from ((text, True) for text in jsonl_texts(path, ("text",), "--data"))
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                piece: list[str] = []
                size = 0
                for line in fh:
                    piece.append(line)
                    size += len(line)
                    if size >= TEXT_PIECE:
                        yield "".join(piece), False
                        piece, size = [], 0
                yield "".join(piece), True


def iter_sequences(files: Sequence[str], tokenizer, seq: int, eos: int | None) -> Iterator[list[int]]:
    """Token sequences of length `seq`, in file order (one pass)."""
    buf: list[int] = []
    for text, end in iter_documents(files):
        if text:
            buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if end and eos is not None:
            buf.append(eos)
        while len(buf) >= seq:
            yield buf[:seq]
            buf = buf[seq:]


class Stream:
    """Training batches, endless (epoch after epoch), deterministic given the
    settings; held-out sequences (every `heldout_every`-th) are skipped."""

    def __init__(self, s: AdapterTrainingSettings, tokenizer, eos: int | None) -> None:
        self.s, self.tokenizer, self.eos = s, tokenizer, eos
        self.rng = random.Random(s.seed)
        self.sequences = 0     # training sequences drawn so far
        self.epochs = 0

    def heldout(self) -> list[list[int]]:
        out = []
        for i, ids in enumerate(iter_sequences(self.s.data, self.tokenizer, self.s.seq, self.eos)):
            if i % self.s.heldout_every == 0:
                out.append(ids)
                if len(out) >= self.s.heldout_sequences:
                    break
        return out

    def _train_sequences(self) -> Iterator[list[int]]:
        while True:
            n = 0
            for i, ids in enumerate(iter_sequences(self.s.data, self.tokenizer, self.s.seq, self.eos)):
                if i % self.s.heldout_every:
                    n += 1
                    yield ids
            if n == 0:
                raise AdapterTrainingError(
                    f"--data: too little text: fewer than {self.s.heldout_every} sequences of --seq {self.s.seq} "
                    f"tokens, all held out; give more text or a smaller --seq")
            self.epochs += 1

    def batches(self) -> Iterator[torch.Tensor]:
        """Batches drawn at random from a pool of `shuffle_buffer` sequences
        (refilled from the endless stream, so the pool never drains)."""
        pool: list[list[int]] = []
        for ids in self._train_sequences():
            pool.append(ids)
            if len(pool) >= max(self.s.shuffle_buffer, self.s.batch):
                picked = [pool.pop(self.rng.randrange(len(pool))) for _ in range(self.s.batch)]
                self.sequences += len(picked)
                yield torch.tensor(picked, dtype=torch.long)


# ---- the adapters ---------------------------------------------------------------

class BoundaryAdapter(nn.Module):
    """h + A h + b, or h + U (V h) + b; starts as the identity (A = 0, U = 0, b = 0)."""

    def __init__(self, hidden: int, rank: int | None, gen: torch.Generator) -> None:
        super().__init__()
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(hidden, hidden))
        else:
            self.up = nn.Parameter(torch.zeros(hidden, rank))
            self.down = nn.Parameter(torch.randn(rank, hidden, generator=gen) / math.sqrt(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return h + F.linear(h, self.weight, self.bias)
        return h + F.linear(F.linear(h, self.down), self.up, self.bias)

    def tensors(self) -> AdapterTensors:
        if self.rank is None:
            return self.weight.detach(), None, self.bias.detach()
        return self.up.detach(), self.down.detach(), self.bias.detach()


class Distiller:
    """The frozen base model with hooks at the boundary depths, and the adapters."""

    def __init__(self, model_dir: Path, depths: Sequence[int], rank: int | None, seed: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.norm = self.model.model.norm
        self.head = self.model.get_output_embeddings()
        self.depths = tuple(depths)
        hidden = int(self.model.config.hidden_size)
        gen = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict({str(d): BoundaryAdapter(hidden, rank, gen) for d in self.depths})
        self._captured: dict[int, torch.Tensor] = {}
        for d in self.depths:  # depth d = the output of layer d-1 (d layers done)
            self.model.model.layers[d - 1].register_forward_hook(self._hook(d))

    def _hook(self, depth: int):
        def grab(_module, _inputs, out):
            self._captured[depth] = (out[0] if isinstance(out, tuple) else out).detach()
        return grab

    def teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Final-layer log-probs [N, V] and the boundary hidden states [N, H]."""
        self._captured.clear()
        with torch.no_grad():
            logits = self.model(input_ids=x, use_cache=False).logits
        hs = {d: h.reshape(-1, h.shape[-1]) for d, h in self._captured.items()}
        return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1), hs

    def readout(self, depth: int, h: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        if adapted:
            h = self.adapters[str(depth)](h)
        return self.head(self.norm(h)).float()

    def losses(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        """KL(final || boundary) per depth (with grad) and top-1 agreement with the final token."""
        logp, hs = self.teacher(x)
        target = logp.argmax(-1)
        loss, agree = {}, {}
        for d in self.depths:
            logq = F.log_softmax(self.readout(d, hs[d]), dim=-1)
            loss[d] = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
            agree[d] = (logq.argmax(-1) == target).float().mean().item()
        return loss, agree

    @torch.no_grad()
    def evaluate(self, sequences: list[list[int]], adapted: bool = True, batch: int = 8) -> dict[str, dict[str, float]]:
        hits = {d: 0 for d in self.depths}
        kl = {d: 0.0 for d in self.depths}
        n = 0
        for i in range(0, len(sequences), batch):
            x = torch.tensor(sequences[i:i + batch], dtype=torch.long)
            logp, hs = self.teacher(x)
            target = logp.argmax(-1)
            n += target.numel()
            for d in self.depths:
                logq = F.log_softmax(self.readout(d, hs[d], adapted), dim=-1)
                hits[d] += int((logq.argmax(-1) == target).sum())
                kl[d] += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))
        return {"agreement": {str(d): round(hits[d] / max(n, 1), 4) for d in self.depths},
                "kl": {str(d): round(kl[d] / max(n, 1), 4) for d in self.depths}, "tokens": n}


# ---- the run ------------------------------------------------------------------------

@dataclass
class TrainingResult:
    out: Path
    card: AdapterCard
    checkpoint: Path
    losses: list[dict[str, float]]    # per logged step: depth -> loss (the descent, for tests and logs)


def default_out(card: ModelCard) -> Path:
    return card.path / ADAPTER_FILE


def checkpoint_path(out: Path) -> Path:
    return out.with_suffix(".ckpt")


def learning_rate(s: AdapterTrainingSettings, step: int, elapsed: float, budget: float | None = None) -> float:
    """Warm-up, then cosine decay over the steps or over `budget` seconds of training (default: --minutes)."""
    progress = step / s.steps if s.steps else elapsed / (budget if budget is not None else s.minutes * 60.0)
    warm = min(1.0, (step + 1) / max(1, s.warmup))
    return s.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(s: AdapterTrainingSettings, on_step: Callable[[int], None] | None = None) -> TrainingResult:
    """Train, checkpoint, write the adapters and their card. `on_step(step)` is
    called after each step (tests interrupt a run from it)."""
    from dexserve.engine.tokenizer import load_tokenizer

    s.check()
    if s.threads:
        torch.set_num_threads(s.threads)
    card = ModelCard.load(s.model)
    depths = training_depths(card.num_layers, s.explorers, s.boundaries)
    out = Path(s.out) if s.out else default_out(card)
    if out.suffix != ".safetensors":
        raise AdapterTrainingError(f"--out: {out} must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_file = checkpoint_path(out)
    base_hash = model_hash(card.path)
    tokenizer = load_tokenizer(card)
    eos = card.eos_token_ids[0] if card.eos_token_ids else None

    torch.manual_seed(s.seed)
    distiller = Distiller(card.path, depths, s.rank, s.seed)
    params = list(distiller.adapters.parameters())
    opt = torch.optim.Adam(params, lr=s.lr, betas=(0.9, 0.99))
    key = s.resume_key() | {"base_model_hash": base_hash, "boundaries": list(depths)}
    selfgen = None
    data = s
    if s.self_generate is not None:   # the model's own continuations become the data (training/selfgen.py)
        from dexserve.training import selfgen as sg

        selfgen = sg.reuse(out, s) if s.resume else None
        if selfgen is None:
            selfgen = sg.generate(distiller.model, tokenizer, s, out, eos,
                                  s.minutes * 60 * s.generate_share if s.minutes else None)
        data = replace(s, data=(selfgen.file,))
    # the wall-clock budget left for training: --minutes less the time generation took
    budget = s.minutes * 60 - (selfgen.seconds if selfgen else 0.0) if s.minutes else None
    stream = Stream(data, tokenizer, eos)
    step, elapsed_before, log = 0, 0.0, []
    heldout = stream.heldout()
    if not heldout:
        raise AdapterTrainingError(f"--data: too little text for one sequence of --seq {s.seq} tokens"
                                   + (f" (self-generated: {selfgen.rows} rows in {selfgen.file})" if selfgen else ""))
    if s.resume:
        if not ckpt_file.is_file():
            raise AdapterTrainingError(f"--resume: no checkpoint at {ckpt_file}")
        ck = torch.load(ckpt_file, weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise AdapterTrainingError(f"--resume: {ckpt_file} is not an adapter-training checkpoint")
        diff = sorted(k for k in key if ck["key"].get(k) != key[k])
        if diff:
            raise AdapterTrainingError(
                f"--resume: {ckpt_file} was made with different settings: "
                + "; ".join(f"{k}: checkpoint {ck['key'].get(k)!r}, now {key[k]!r}" for k in diff))
        distiller.adapters.load_state_dict(ck["adapters"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed_before, before, log = ck["step"], ck["elapsed"], ck["before"], ck["log"]
    else:
        before = distiller.evaluate(heldout, adapted=False, batch=s.batch)

    def save_checkpoint(elapsed: float) -> None:
        tmp = ckpt_file.with_suffix(".ckpt.tmp")
        torch.save({"format": CHECKPOINT_FORMAT, "key": key, "step": step, "elapsed": elapsed,
                    "adapters": distiller.adapters.state_dict(), "optimizer": opt.state_dict(),
                    "before": before, "log": log}, tmp)
        tmp.replace(ckpt_file)

    batches = stream.batches()
    for _ in range(step):   # replay the stream to where the checkpoint stopped (no model runs)
        next(batches)

    from tqdm import tqdm

    bar = tqdm(total=s.steps, initial=step, disable=not s.progress, unit="step", dynamic_ncols=True,
               desc=f"adapters {','.join(map(str, depths))}" + (f" ({s.minutes:g} min)" if s.minutes else ""))
    ema_loss: dict[int, float] = {}
    ema_agree: dict[int, float] = {}
    t0 = time.monotonic()
    elapsed = elapsed_before
    try:
        while True:
            elapsed = elapsed_before + time.monotonic() - t0
            if (s.steps is not None and step >= s.steps) or (budget is not None and elapsed >= budget):
                break
            lr = learning_rate(s, step, elapsed, budget)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, agree = distiller.losses(next(batches))
            opt.zero_grad(set_to_none=True)
            sum(loss.values()).backward()
            opt.step()
            step += 1
            for d in depths:
                ema_loss[d] = loss[d].item() if d not in ema_loss else 0.9 * ema_loss[d] + 0.1 * loss[d].item()
                ema_agree[d] = agree[d] if d not in ema_agree else 0.9 * ema_agree[d] + 0.1 * agree[d]
            log.append({str(d): round(loss[d].item(), 5) for d in depths})
            bar.update(1)
            bar.set_postfix_str(" ".join(f"d{d}: kl {ema_loss[d]:.3f} agree {100 * ema_agree[d]:.0f}%" for d in depths))
            if step % s.checkpoint_every == 0:
                save_checkpoint(elapsed_before + time.monotonic() - t0)
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        save_checkpoint(elapsed_before + time.monotonic() - t0)
        bar.close()
        raise
    bar.close()
    save_checkpoint(elapsed)

    after = distiller.evaluate(heldout, adapted=True, batch=s.batch)
    write_adapter_file(out, {d: distiller.adapters[str(d)].tensors() for d in depths})
    meta = AdapterCard(base_model_hash=base_hash, base_model=card.name, boundaries=list(depths), rank=s.rank,
                       hidden=int(card.config["hidden_size"]), layers=card.num_layers,
                       data_tokens=step * s.batch * s.seq, steps=step, training_seconds=round(elapsed, 1),
                       heldout_tokens=after["tokens"], heldout_agreement=after["agreement"],
                       heldout_agreement_before=before["agreement"], heldout_kl=after["kl"],
                       data=[str(Path(f)) for f in data.data],
                       data_source="self-generated" if selfgen else "text",
                       self_generated=asdict(selfgen) if selfgen else {},
                       settings={k: v for k, v in asdict(s).items() if k not in ("model", "data", "out", "progress")})
    meta.write(card_path(out))
    resolve_adapters(card, str(out), depths)   # what the engine will check: it loads
    return TrainingResult(out=out, card=meta, checkpoint=ckpt_file, losses=log)
