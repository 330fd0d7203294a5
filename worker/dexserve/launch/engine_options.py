"""Engine flags, one definition for every command that builds an engine
(`dex generate`, `dex bench`, `dex worker`, `dex up`): flags and environment
become an `EngineConfig` here, at the CLI edge, and nowhere else."""

from __future__ import annotations

import argparse
import logging
import os
import shutil

from dexserve.commands.options import add_limit_arguments, limit_flags, limits_from_args
from dexserve.engine.config import (AUTO_BATCH_CAP, AUTO_EXPLORERS, AUTO_WIDTH, DTYPES, EXECUTORS, EngineConfig,
                                    FREE_SHARE)


def add_engine_arguments(parser: argparse.ArgumentParser, modes: bool = True) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=os.environ.get("DEX_MODEL_DIR") or None,
                   help="local checkpoint directory (env DEX_MODEL_DIR; default: the shipped dexcode-6m)")
    g.add_argument("--adapters", default=os.environ.get("DEX_ADAPTERS") or "auto",
                   help="boundary adapters (dex train-adapter): a .safetensors file or a directory holding "
                        "dex_adapters.safetensors, 'none', or 'auto' = dex_adapters.safetensors next to the model "
                        "if there is one (env DEX_ADAPTERS; default auto)")
    g.add_argument("--explorers", "-K", type=int, default=int(os.environ.get("DEX_EXPLORERS", EngineConfig.explorers)),
                   help="depth explorers K (1..layers): the layer stack is cut into K even segments (env "
                        f"DEX_EXPLORERS; default 0 = auto: K={AUTO_EXPLORERS}, one process per explorer when "
                        "there is a core, or a GPU on --device cuda, for each; see --executor)")
    g.add_argument("--width", "-W", type=int, default=int(os.environ.get("DEX_WIDTH", 0)),
                   help=f"capacity W: rows each explorer runs per round (env DEX_WIDTH; default 0 = auto: "
                        f"{AUTO_WIDTH}, or the batch if larger)")
    if modes:
        g.add_argument("--mode", default="dex", help="dex | ar | select:J (spawn only at boundary J)")
    g.add_argument("--no-decs", dest="decs", action="store_false",
                   help="turn off depth-coupled sampling (each boundary proposes its own top-1)")
    g.add_argument("--policy", choices=("priority", "oldest"), default="priority",
                   help="which nodes run when capacity binds")
    g.add_argument("--max-batch", type=int, default=int(os.environ.get("DEX_MAX_BATCH", 0)),
                   help="requests decoded together (env DEX_MAX_BATCH; default 0 = auto: as many full-context "
                        f"requests as the KV budget holds, at most {AUTO_BATCH_CAP['cpu']} on CPU and "
                        f"{AUTO_BATCH_CAP['cuda']} on CUDA)")
    g.add_argument("--kv-memory", type=float,
                   default=float(os.environ["DEX_KV_MEMORY"]) if os.environ.get("DEX_KV_MEMORY") else None,
                   help="GiB for the KV cache, which sizes an auto --max-batch (env DEX_KV_MEMORY; default: "
                        f"{FREE_SHARE['cuda']:.0%}% of the GPU's free memory, {FREE_SHARE['cpu']:.0%}% of the host's "
                        "available memory, less the weights)")
    g.add_argument("--prefill-chunk", type=int, default=int(os.environ.get("DEX_PREFILL_CHUNK", EngineConfig.prefill_chunk)),
                   help="prompt positions per prefill step (env DEX_PREFILL_CHUNK)")
    g.add_argument("--prefill-share", type=float,
                   default=float(os.environ.get("DEX_PREFILL_SHARE", EngineConfig.prefill_share)),
                   help="while other requests decode, a new prompt is prefilled in chunks between their rounds, "
                        "on average this many round-times per round; a chunk dearer than that waits a few rounds "
                        "and runs alone, so a running stream's gap grows by one chunk at most; 0 prefills whole "
                        "prompts at once, pausing the running streams (env DEX_PREFILL_SHARE; default 1)")
    g.add_argument("--executor", choices=EXECUTORS,
                   default=os.environ.get("DEX_EXECUTOR", EngineConfig.executor),
                   help="reference: all explorers in this process; distributed: one process per explorer; auto "
                        "(default, env DEX_EXECUTOR): distributed with the auto K when there are K cores (GPUs) "
                        "for it, reference otherwise and whenever --explorers is given")
    g.add_argument("--transport", choices=("auto", "shm", "torch"),
                   default=os.environ.get("DEX_TRANSPORT", "auto"),
                   help="distributed executor: shm = shared memory between CPU explorers on this host, "
                        "torch = torch.distributed (gloo on CPU, NCCL on CUDA); auto picks shm for CPU")
    g.add_argument("--device", default=os.environ.get("DEX_DEVICE", "cpu"), help="cpu or cuda")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile each explorer step (fullgraph). Default: on for --device cpu (compiled "
                        "steps are cached across start-ups in $TORCHINDUCTOR_CACHE_DIR, default "
                        "~/.cache/dexserve/inductor), off on CUDA, where captured CUDA graphs are the fast path")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run explorer steps eagerly (no start-up compilation; several times slower per token)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run steps eagerly instead of replaying captured graphs")
    g.add_argument("--threads", type=int, default=int(os.environ["DEX_THREADS"]) if os.environ.get("DEX_THREADS") else None,
                   help="torch intra-op threads (env DEX_THREADS; default on the distributed executor: each explorer "
                        "process, the coordinator included, gets its share of the usable cores, cores // K, at "
                        "least 1; torch's default otherwise)")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default=os.environ.get("DEX_DTYPE", "auto"),
                   help="weights and activations dtype (env DEX_DTYPE; default auto: the checkpoint's own dtype "
                        "on CUDA, float32 on CPU). Every mode equals ar in the same dtype")
    add_limit_arguments(parser)


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The argv that reproduces these engine flags in a child process (`dex up` -> workers)."""
    flags = ["--explorers", str(args.explorers), "--width", str(args.width), "--policy", args.policy,
             "--max-batch", str(args.max_batch), *(["--kv-memory", str(args.kv_memory)] if args.kv_memory else []),
             "--prefill-chunk", str(args.prefill_chunk),
             "--prefill-share", str(args.prefill_share), "--executor", args.executor, "--transport", args.transport,
             "--device", args.device, "--dtype", args.dtype, *limit_flags(args)]
    if hasattr(args, "mode"):
        flags += ["--mode", args.mode]
    if args.model:
        flags += ["--model", args.model]
    if args.adapters != "auto":
        flags += ["--adapters", args.adapters]
    if not args.decs:
        flags.append("--no-decs")
    if args.compile is not None:
        flags.append("--compile" if args.compile else "--no-compile")
    if not args.cuda_graphs:
        flags.append("--no-cuda-graphs")
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags


def compile_default(args: argparse.Namespace) -> bool:
    """--compile / --no-compile if given; otherwise compiled on CPU (the fast path) where a C++
    compiler exists (inductor needs one; an image without it runs eager steps, with a warning),
    and on CUDA the captured CUDA graphs of eager steps."""
    if args.compile is not None:
        return args.compile
    if str(args.device).startswith("cuda"):
        return False
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        logging.getLogger(__name__).warning(
            "no C++ compiler (g++) here: explorer steps run eagerly, several times slower; install g++ for the "
            "compiled fast path, or pass --no-compile to silence this")
        return False
    return True


def compile_notice(config: EngineConfig) -> str | None:
    """What to tell someone waiting on an engine whose steps compile, before it loads: on a cold
    cache that takes minutes on CPU (README, "Use it"), and silence would look like a hang."""
    if not config.compile:
        return None
    from dexserve.engine.executor import compile_cache_dir

    cache = compile_cache_dir()
    if os.path.isdir(cache) and os.listdir(cache):
        return None
    return (f"compiling the explorer steps: the first start on a host takes minutes on CPU, later starts load "
            f"them from {cache} (--no-compile starts at once, with slower eager steps)")


def engine_config(args: argparse.Namespace, mode: str | None = None) -> EngineConfig:
    limits = limits_from_args(args)
    return EngineConfig(explorers=args.explorers, width=args.width, mode=mode or getattr(args, "mode", "dex"),
                        decs=args.decs, policy=args.policy, max_context=limits.max_context, max_batch=args.max_batch,
                        executor=args.executor, transport=args.transport, device=args.device,
                        compile=compile_default(args), cuda_graphs=args.cuda_graphs,
                        max_new_tokens=limits.max_new_tokens, threads=args.threads, dtype=args.dtype,
                        adapters=args.adapters, kv_memory_gib=args.kv_memory, prefill_chunk=args.prefill_chunk, prefill_share=args.prefill_share)
