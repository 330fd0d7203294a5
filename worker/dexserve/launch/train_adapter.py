"""`dex train-adapter`: train boundary adapters for a standard checkpoint on the
user's text (flags -> `AdapterTrainingSettings`; the training lives in
dexserve.training.adapters)."""

from __future__ import annotations

import argparse
import json
import sys

from dexserve.training.settings import AdapterTrainingSettings

D = AdapterTrainingSettings(model=None, data=())   # the defaults, defined once

HELP = "Train per-boundary adapters (base model frozen) so a standard checkpoint's early readouts guess the final token."


def _depths(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--boundaries: {value!r} is not a comma-separated list of depths") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local checkpoint directory (default: the shipped model)")
    p.add_argument("--data", nargs="+", default=[],
                   help="training text: plain text files, or .jsonl files with a 'text' field per line (streamed); "
                        "with --self-generate, where prompts are cut from")
    p.add_argument("--explorers", "-K", type=int, default=None,
                   help="train the boundary depths of the K-explorer grid (b_k = k*L//K)")
    p.add_argument("--boundaries", type=_depths, default=(),
                   help="extra boundary depths, e.g. 2,4,6 (with --explorers: both grids)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps (reproducible, resumable exactly)")
    p.add_argument("--rank", type=int, default=None, help="low-rank adapters h + U(V h) + b (default: full affine h + A h + b)")
    p.add_argument("--out", default=None,
                   help="adapter file (.safetensors; default: dex_adapters.safetensors next to the model); "
                        "its card is written beside it as .json, the checkpoint as .ckpt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint next to --out")
    p.add_argument("--batch", type=int, default=D.batch, help="sequences per step")
    p.add_argument("--seq", type=int, default=D.seq, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--heldout-every", type=int, default=D.heldout_every,
                   help="hold out every N-th sequence of the data (never trained on; measures agreement)")
    p.add_argument("--heldout-sequences", type=int, default=D.heldout_sequences, help="held-out sequences evaluated for the card")
    g = p.add_argument_group("self-generated data (the model's own outputs)")
    g.add_argument("--self-generate", type=int, default=None, metavar="N",
                   help="train on up to N continuations the base model writes itself, of prompts cut from --data "
                        "(one per .jsonl row, one per --seq tokens of a text file) or taken from --prompts; with "
                        "--minutes, generating takes at most --generate-share of the budget and training the rest")
    g.add_argument("--prompts", default=None,
                   help="with --self-generate: JSONL of {\"prompt\": ...} (or \"text\") to continue instead of --data windows")
    g.add_argument("--prompt-tokens", type=int, default=D.prompt_tokens, help="tokens of each prompt (default %(default)s)")
    g.add_argument("--generate-tokens", type=int, default=D.generate_tokens, help="tokens generated per prompt, EOS ignored (default %(default)s)")
    g.add_argument("--generate-share", type=float, default=D.generate_share,
                   help="with --minutes: the share of the budget generation may take (default %(default)s)")
    g.add_argument("--generate-batch", type=int, default=D.generate_batch, help="prompts continued together (default %(default)s)")
    g.add_argument("--temperature", type=float, default=D.temperature,
                   help="0 = greedy continuations; above 0, sampled (seeded by --seed)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the card as JSON when done")


def settings_from_args(args: argparse.Namespace) -> AdapterTrainingSettings:
    return AdapterTrainingSettings(
        model=args.model, data=tuple(args.data), explorers=args.explorers, boundaries=tuple(args.boundaries),
        rank=args.rank, steps=args.steps, minutes=args.minutes, out=args.out, resume=args.resume, batch=args.batch,
        seq=args.seq, lr=args.lr, seed=args.seed, threads=args.threads, checkpoint_every=args.checkpoint_every,
        heldout_every=args.heldout_every, heldout_sequences=args.heldout_sequences, progress=args.progress,
        self_generate=args.self_generate, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
        generate_tokens=args.generate_tokens, generate_share=args.generate_share, generate_batch=args.generate_batch,
        temperature=args.temperature)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dexserve.contract.model_card import ModelLoadError
    from dexserve.training.adapters import AdapterTrainingError, checkpoint_path, train

    settings = settings_from_args(args)
    try:
        result = train(settings)
    except (AdapterTrainingError, ModelLoadError) as exc:
        print(f"dex train-adapter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from dexserve.training.adapters import default_out
        from dexserve.contract.model_card import ModelCard

        out = settings.out or default_out(ModelCard.load(settings.model))
        if checkpoint_path(out).is_file():
            print(f"\ndex train-adapter: interrupted; checkpoint {checkpoint_path(out)} kept, "
                  f"continue with the same flags plus --resume", file=sys.stderr)
        else:   # e.g. while --self-generate was still generating: nothing to resume from
            print("\ndex train-adapter: interrupted before the first checkpoint; run it again", file=sys.stderr)
        return 130
    card = result.card
    if args.json:
        print(json.dumps({"out": str(result.out), **asdict(card)}, indent=2))
    else:
        print(f"adapters: {result.out} (card {result.out.with_suffix('.json')})")
        if card.self_generated:
            g = card.self_generated
            print(f"self-generated data: {g['rows']} continuations ({g['tokens']} tokens, {g['decoding']}) in "
                  f"{g['seconds']:.0f} s, stopped by {g['stopped']}: {g['file']}")
        print(f"steps {card.steps}, {card.data_tokens} training tokens, {card.training_seconds:.0f} s; "
              f"held-out agreement with the final token ({card.heldout_tokens} tokens):")
        print("| depth | before | after |\n|---|---|---|")
        for d in card.boundaries:
            print(f"| {d} | {card.heldout_agreement_before[str(d)]:.3f} | {card.heldout_agreement[str(d)]:.3f} |")
    return 0
