"""`dex generate`: stream text as it is committed, from the local engine or,
with --server, from a running service (same flags)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from dexserve.launch.engine_options import add_engine_arguments, compile_notice, engine_config


HELP = "Generate text, locally with the engine or from a running service (--server)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--server", default=None, help="HOST:PORT of a running gateway")
    p.add_argument("--token", default=None, help="bearer token for --server")


def run(args: argparse.Namespace) -> int:
    if args.server:
        from dexserve.client import run_generate_cli

        return run_generate_cli(args)
    from dexserve.engine.engine import DexEngine
    from dexserve.contract.model_card import ModelLoadError
    from dexserve.contract.request import Finished, GenerationRequest, InvalidRequest, SamplingParams

    try:
        config = engine_config(args)
        if notice := compile_notice(config):
            print(f"dex generate: {notice}", file=sys.stderr, flush=True)
        engine = DexEngine.load(args.model, config)
    except (ModelLoadError, ValueError) as exc:
        print(f"dex generate: error: {exc}", file=sys.stderr)
        return 2
    try:
        req = GenerationRequest(request_id=uuid.uuid4().hex, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.seed),
                                stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        t0 = time.perf_counter()
        token_ids: list[int] = []
        text: list[str] = []
        finish = None
        for ev in engine.generate(req):
            if isinstance(ev, Finished):
                finish = ev
                text.append(ev.text)
                if not args.json:
                    sys.stdout.write(ev.text)
            else:
                token_ids.append(ev.token_id)
                text.append(ev.text)
                if not args.json:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
        seconds = time.perf_counter() - t0
    except (InvalidRequest, ValueError) as exc:
        print(f"dex generate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.close()   # explorer processes, and the shared memory they met in
    stats, info = engine.stats, engine.info
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids,
                          "finish_reason": finish.reason.value if finish else None,
                          "rounds": stats.rounds, "rpt": stats.rpt, "accept_hist": stats.accept_hist,
                          "fallbacks": stats.fallbacks, "wasted_node_segments": stats.wasted_node_segments,
                          "mode": args.mode, "explorers": info.explorers, "executor": info.executor, "width": info.width,
                          "adapters": engine.adapters.as_dict() if engine.adapters else None,
                          "seconds": round(seconds, 4),
                          "tokens_per_s": round(len(token_ids) / seconds, 2) if seconds > 0 else None}))
    else:
        sys.stdout.write("\n")
    return 0
