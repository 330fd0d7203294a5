"""The torchrun entry for ranks > 0:

    torchrun --nproc-per-node K ... python -m dexserve.engine.distributed.torchrun

Rank 0 is the worker (`--executor distributed`); it decides every executor
setting (model, spec with compile / CUDA graphs / null step, threads, timeout)
and hands it to the other ranks over the start-up handshake
(`share_settings` / `receive_settings`), so a rank never parses its own copy
of the engine flags and cannot disagree with rank 0.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from dexserve.engine.distributed.explorer import run_rank
from dexserve.engine.distributed.wire import ExplorerSettings
from dexserve.engine.transport import TIMEOUT, CollectiveTransport

STARTUP = timedelta(minutes=15)


def init_torchrun(timeout: timedelta = TIMEOUT) -> None:
    """Every rank, before the device is known: gloo for host data (the
    handshake, commands), NCCL for CUDA tensors where CUDA exists."""
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timeout)


def share_settings(settings: ExplorerSettings) -> None:
    """Rank 0: send the settings to every other rank."""
    dist.broadcast_object_list([settings], src=0, device=torch.device("cpu"))


def receive_settings() -> ExplorerSettings:
    """Ranks > 0: rank 0's settings."""
    box: list = [None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    settings = box[0]
    if not isinstance(settings, ExplorerSettings):
        raise RuntimeError(f"rank 0 sent {type(settings).__name__}, not ExplorerSettings")
    return settings


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="a DEX explorer rank under torchrun; every setting comes from "
                                        "rank 0 (the worker with --executor distributed)").parse_args(argv)
    init_torchrun(STARTUP)
    settings = receive_settings()
    settings.apply()
    rank = dist.get_rank()
    sp = settings.spec
    print(f"dex explorer rank {rank} settings: threads={torch.get_num_threads()} compile={sp.compile} "
          f"cuda_graphs={sp.cuda_graphs} null_step={sp.null_step} device={sp.device} model={settings.model_path}",
          file=sys.stderr, flush=True)
    transport = CollectiveTransport(rank, dist.get_world_size())
    try:
        run_rank(rank, settings, transport, None)
    finally:
        transport.close()


if __name__ == "__main__":
    main()
