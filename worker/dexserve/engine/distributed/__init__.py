"""Depth explorers on K devices: one process per explorer.

Rank k runs explorer k+1: it loads only its own layers (rank 0 also the
embedding; every rank the shared norm and head, since every boundary reads
out) and holds only its layers' slice of the KV buffers. Rank 0 is also the
coordinator: it owns the lattice, writes each round's plan into one static
int64 payload, runs explorer 1, and collects every explorer's ranked
candidates. Explorer k's hidden states reach explorer k+1 for a later round.
All explorers of a round run at the same time; a round costs the slowest
segment plus the plan, the hand-off and the gather.

Modules: `wire` (payload layout, command codes, the settings rank 0 hands
out), `coordinator` (`DistributedExecutor`), `explorer` (the explorer process
loop), `torchrun` (the entry of ranks > 0 under torchrun). How messages travel
is the transport (`dexserve.engine.transport`): shared memory for CPU
explorers on this host, torch.distributed otherwise (gloo on CPU, NCCL on CUDA
with rank k on cuda:k). The worker starts the explorer processes itself;
under torchrun (RANK/WORLD_SIZE set) rank 0 is the worker and ranks > 0 run
`python -m dexserve.engine.distributed.torchrun`, taking every setting from
rank 0. A dead explorer surfaces as `ExplorerFailure`; `restart()` brings up a
fresh set.
"""

from dexserve.engine.distributed.coordinator import DistributedExecutor, ExplorerFailure, resolve_transport

__all__ = ["DistributedExecutor", "ExplorerFailure", "resolve_transport"]
