"""Train the shipped early-exit code model (LayerSkip-style loss).

A Llama-architecture model is trained from scratch on the Python standard
library's source with a loss at every layer through the shared final norm and
LM head, deeper layers weighted more, so every depth's readout predicts the
next token and DEX has something to explore. The result is a plain Hugging
Face checkpoint (config.json, model.safetensors, tokenizer) that
`AutoModelForCausalLM` / `AutoTokenizer` load offline.

    python -m dexserve.training.train_early_exit --out service/dexserve/models/dexcode-6m --minutes 35

`--no-early-exit` trains the same architecture on the same corpus with the
ordinary loss only (final layer): a *standard* checkpoint, the kind users
bring, whose intermediate readouts were never trained (the baseline for
`dex train-adapter`, worker/benchmarks/adapters.py).

The learning-rate schedule runs on progress = max(step/steps, time/minutes), so
a time-boxed run still decays fully; the log records the steps reached, and
`--steps N --minutes 0` replays a run by step count alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dexserve.training.corpus import heldout_prompts, split, stdlib_files, write_jsonl

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=None, pad_token=EOS)
    fast.model_max_length = 1024
    fast.save_pretrained(out)
    return fast


def layer_weights(n_layers: int) -> list[float]:
    """Loss weight per exit depth 1..L: 0.3*l/L below the top, 1.0 at the top."""
    return [0.3 * (l + 1) / n_layers for l in range(n_layers - 1)] + [1.0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=35.0, help="wall-clock budget; 0 = no limit")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=64, help="held-out benchmark prompts to write")
    p.add_argument("--no-early-exit", dest="early_exit", action="store_false",
                   help="ordinary next-token loss at the final layer only (a standard checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue training the checkpoint already in --out (its tokenizer is kept)")
    args = p.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "training_log.jsonl", "a" if args.resume else "w")
    t0 = time.time()

    files = stdlib_files()
    train_files, held = split(files)
    write_jsonl(heldout_prompts(held, args.prompts, seed=args.seed), args.out / "heldout_prompts.jsonl")
    (args.out / "heldout_files.txt").write_text("".join(f.relpath + "\n" for f in held))

    import random
    rng = random.Random(args.seed)
    if args.resume:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.out, local_files_only=True)
    else:
        tok_sample = rng.sample([f.text for f in train_files], k=min(1500, len(train_files)))
        tokenizer = train_tokenizer(tok_sample, args.vocab, args.out)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)

    ids: list[int] = []
    for f in train_files:
        ids.extend(tokenizer(f.text, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.long)
    val_ids: list[int] = []
    for f in held[:40]:
        val_ids.extend(tokenizer(f.text, add_special_tokens=False)["input_ids"])
        val_ids.append(eos_id)
    val = torch.tensor(val_ids, dtype=torch.long)
    print(f"corpus: {len(train_files)} train files, {len(held)} held out, {len(data)} train tokens, "
          f"tokenize took {time.time() - t0:.0f}s", flush=True)

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    previous = None
    if args.resume:
        model = LlamaForCausalLM.from_pretrained(args.out, local_files_only=True, dtype=torch.float32)
        previous = json.loads((args.out / "training_summary.json").read_text())
    else:
        model = LlamaForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    captured: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    weights = layer_weights(args.layers)

    def losses(batch: torch.Tensor, every_depth: bool = True) -> list[torch.Tensor]:
        captured.clear()
        model.model(input_ids=batch[:, :-1])
        out = []
        for h in (captured if every_depth else captured[-1:]):
            logits = model.lm_head(model.model.norm(h))
            out.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)))
        return out

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + (1000 if args.resume else 0))
    budget = args.minutes * 60.0
    train_start = time.time()
    step = 0
    while True:
        elapsed = time.time() - train_start
        progress = max(step / args.steps, elapsed / budget if budget > 0 else 0.0)
        if progress >= 1.0:
            break
        warm = min(1.0, (step + 1) / 50)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()])
        if args.early_exit:
            per_depth = losses(batch)
            loss = sum(w * l for w, l in zip(weights, per_depth)) / sum(weights)
        else:  # the standard recipe: the final layer's loss only
            per_depth = losses(batch, every_depth=False)
            loss = per_depth[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            rec = {"step": step, "elapsed_s": round(time.time() - train_start, 1), "lr": lr,
                   "loss": [round(l.item(), 4) for l in per_depth],
                   "tokens_per_s": round(step * args.batch * args.seq / (time.time() - train_start), 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)

    model.eval()
    with torch.no_grad():
        vb = torch.stack([val[i:i + args.seq + 1] for i in range(0, min(len(val) - args.seq - 1, 64 * args.seq), args.seq)])
        val_losses = [round(l.item(), 4) for l in losses(vb)]
    model.config.use_cache = True
    model.save_pretrained(args.out, safe_serialization=True)
    if previous is not None:
        summary_prev = previous.get("stages", [previous])
    else:
        summary_prev = []
    summary = {"steps": step, "minutes": round((time.time() - train_start) / 60, 1),
               "train_tokens_seen": step * args.batch * args.seq, "params": n_params,
               "val_loss_per_depth": val_losses, "seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()}}
    summary["stages"] = summary_prev + [{k: v for k, v in summary.items() if k != "stages"}]
    summary["total_steps"] = sum(st["steps"] for st in summary["stages"])
    summary["total_train_tokens_seen"] = sum(st["train_tokens_seen"] for st in summary["stages"])
    summary["total_minutes"] = round(sum(st["minutes"] for st in summary["stages"]), 1)
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary, flush=True)


if __name__ == "__main__":
    main()
